"""Real servers for tests, started on free 127.0.0.1 ports and stopped after:
SeaweedFS (S3 API, `seaweed.py`) and Prometheus + Pushgateway (`prometheus.py`)."""
