"""Real servers for weir's tests and dev work: Kafka (KRaft), S3 (S3Proxy), kube-apiserver."""
