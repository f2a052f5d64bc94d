"""Kafka streaming: the same transform and rules on Spark Structured Streaming."""
