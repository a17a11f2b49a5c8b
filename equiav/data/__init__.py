"""Data half of the pipeline: lists, downloads, media decoding, features, storage, demo data."""
