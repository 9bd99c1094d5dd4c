"""Real servers for weir's tests and dev work: Kafka (KRaft), S3 (MinIO), kube-apiserver."""
