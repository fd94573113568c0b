"""Default topic names (the service can be configured to use others)."""

REQUESTS = "svd-requests"
RESULTS = "svd-results"
DLQ = "svd-dlq"
