"""Rows from data files: reading each file format (`readers`), recognising row schemas (`formats`), and mixing
weighted sources (`mixing`). Fetching from hf://, s3://, https:// and oci:// is in `sources/`."""
