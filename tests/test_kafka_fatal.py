"""A fatal Kafka producer error: librdkafka gives up on an idempotent producer for good
(KafkaError.fatal()), and only a new producer, republishing from the watermark, goes on.

The real broker provokes one on demand: with enable.gapless.guarantee, a batch the broker
refuses for good (larger than the topic's max.message.bytes) is a fatal error, where
without it the change would go to the DLQ."""

from conftest import published_action_ids, query
from test_dlq import set_max_message_bytes

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588


def test_a_fatal_producer_error_gets_a_new_producer_that_republishes(pipeline):
    set_max_message_bytes(pipeline.topic, 100)
    producer = pipeline.producer(KAFKA_CONFIG="enable.gapless.guarantee=true")
    pipeline.consumer()
    query("source", "INSERT INTO employees VALUES (1, 'Grace', 'Hopper', '1906-12-09', 'NYC', 1)")
    producer.wait_for_log("unable to satisfy gap-less guarantee")
    set_max_message_bytes(pipeline.topic, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
    query("source", "INSERT INTO employees VALUES (2, 'Alan', 'Turing', '1912-06-23', 'London', 2)")
    pipeline.wait_for_equal()
    assert "Kafka producer failed for good" in producer.log()
    assert sorted(published_action_ids(pipeline)) == [1, 2]
    assert pipeline.messages(pipeline.dlq_topic) == []
