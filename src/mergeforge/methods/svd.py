"""The SVD family (being written: TSV-M, Iso-C, Iso-CTS)."""
