"""An independent Kafka client for Dima's tests: Confluent's `confluent-kafka`
(its own bundled librdkafka, every codec), never Dima's producer or consumer.

  create BROKERS TOPIC               create TOPIC (4 partitions)
  produce BROKERS TOPIC CODEC FILE   write FILE's lines to TOPIC with CODEC
                                     (4 partitions, keyed by line number)
  consume BROKERS TOPIC COUNT        read COUNT messages from the beginning;
                                     print {"count", "lines"} as JSON

With KAFKA_CA set, the client speaks TLS and trusts that CA.
"""

import json
import os
import sys

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def connection(brokers):
    """The client settings: TLS with the CA in $KAFKA_CA when it is set."""
    settings = {"bootstrap.servers": brokers}
    if os.environ.get("KAFKA_CA"):
        settings.update({"security.protocol": "ssl", "ssl.ca.location": os.environ["KAFKA_CA"]})
    return settings


def create(brokers, topic):
    admin = AdminClient(connection(brokers))
    for future in admin.create_topics([NewTopic(topic, 4, 1)]).values():
        future.result(timeout=30)


def produce(brokers, topic, codec, path):
    create(brokers, topic)
    producer = Producer(dict(connection(brokers), **{"compression.type": codec, "linger.ms": 20}))
    sent = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            line = line.rstrip("\n")
            while True:
                try:
                    producer.produce(topic, key=str(number), value=line)
                    break
                except BufferError:
                    producer.poll(0.1)
            sent += 1
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} messages not delivered")
    print(json.dumps({"sent": sent}))


def consume(brokers, topic, count):
    consumer = Consumer(
        {
            **connection(brokers),
            "group.id": f"independent-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    lines = []
    idle = 0
    while len(lines) < count and idle < 300:
        message = consumer.poll(0.1)
        if message is None:
            idle += 1
            continue
        if message.error():
            sys.exit(f"consume: {message.error()}")
        idle = 0
        lines.append(message.value().decode("utf-8"))
    consumer.close()
    print(json.dumps({"count": len(lines), "lines": sorted(lines)}))


def main():
    command = sys.argv[1]
    if command == "create":
        create(sys.argv[2], sys.argv[3])
        print(json.dumps({"created": sys.argv[3]}))
    elif command == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif command == "consume":
        consume(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
