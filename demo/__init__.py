"""The README's main job: local Kafka, the consumer service and a demo workload."""
