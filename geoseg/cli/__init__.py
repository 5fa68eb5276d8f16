"""The ``geoseg`` command line: a thin shell over the stage functions."""
