"""Data: dataset readers, image decoding, the data table and patient-grouped splits."""
