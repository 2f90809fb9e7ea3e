"""Coverage-guided fuzz targets for every parser pvcore runs on untrusted bytes (see docs/fuzzing.md)."""
