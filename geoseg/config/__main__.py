"""``python -m geoseg.config``: print the configuration reference (docs/config.md)."""

from geoseg.config.docs import config_reference_markdown

print(config_reference_markdown())
