"""The fuzz targets, one module per parser of guest input (see ``fuzz``)."""
