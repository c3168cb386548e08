"""Inputs from and outputs to S3-compatible object storage (docs/storage.md).

merge_worker.storage.staging downloads every s3:// source into the run's scratch folder and rewrites the
spec so the readers see ordinary paths on a scratch claim; merge_worker.storage.upload pushes a finished
output. boto3 is imported only when a spec names an s3:// URI.
"""
