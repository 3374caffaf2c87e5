#!/usr/bin/env python3
"""Contract conformance: every message on every catalog topic of a broker, checked as a downstream team
would check it, with tools that share no code with the services.

- Event topics (`*catalog.users`, `*catalog.products`): the CloudEvents attributes are read with the
  official CloudEvents SDK's Kafka binding (binary mode); the body is validated against the JSON Schema
  that `events/schemas/` publishes for its type and version; the key must be the aggregate id; the
  headers must agree with the body (id, type, subject, time, sequence, schema version, aggregate type);
  the topic must be the one of the aggregate type.
- Retry topics (`*catalog.images.retry.N`) and the dead-letter topic (`*catalog.images.dlq`): the body is
  validated against `events/schemas/pipeline/`, and the failure headers must agree with it.
- Messages a test marked as deliberate fixtures (header `catalog-test-fixture`: garbage, sentinels) are
  counted and skipped; nothing else is.

Any mismatch is printed with its topic, partition, offset and reason, and the exit status is 1.
Usage: conformance.py --brokers HOST:PORT [--idle SECONDS]   (CONFORMANCE_SHOW=N: problems printed, 200)
"""

import argparse
import datetime
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import jsonschema
from cloudevents.v1.kafka import KafkaMessage, from_binary
from confluent_kafka import Consumer, KafkaError
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "events" / "schemas"
EVENT_TOPIC = re.compile(r"catalog\.(users|products)$")
RETRY_TOPIC = re.compile(r"catalog\.images\.retry\.\d+$")
DLQ_TOPIC = re.compile(r"catalog\.images\.dlq$")
FIXTURE_HEADER = "catalog-test-fixture"

_validators = {}


def validator(path):
    if path not in _validators:
        schema = json.loads(path.read_text())
        _validators[path] = jsonschema.Draft202012Validator(schema)
    return _validators[path]


def schema_errors(path, body):
    if not path.exists():
        return [f"no published schema {path.relative_to(ROOT)}"]
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator(path).iter_errors(body)]


def instant(text):
    return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))


def check_event(topic, key, value, headers):
    problems = []
    try:
        body = json.loads(value)
    except (TypeError, ValueError) as e:
        return [f"body is not JSON: {e}"]
    if not isinstance(body, dict):
        return ["body is not a JSON object"]
    event_type, version = body.get("event_type"), body.get("schema_version")
    problems += schema_errors(SCHEMAS / f"{event_type}.v{version}.json", body)
    aggregate_type = body.get("aggregate_type")
    expected_topic = {"user": "users", "product": "products"}.get(aggregate_type)
    if not topic.endswith(f"catalog.{expected_topic}"):
        problems.append(f"a {aggregate_type} event on topic {topic}")
    if key != str(body.get("aggregate_id")).encode():
        problems.append(f"key {key!r} is not the aggregate id {body.get('aggregate_id')}")
    try:
        event = from_binary(KafkaMessage(headers=headers, key=key, value=value))
    except Exception as e:  # the SDK's own refusal is a finding, whatever its type
        return problems + [f"not a CloudEvent in binary mode: {type(e).__name__}: {e}"]
    attributes = event.get_attributes()
    expected = {
        "specversion": "1.0",
        "id": str(body.get("event_id")),
        "type": event_type,
        "subject": str(body.get("aggregate_id")),
        "aggregatetype": aggregate_type,
        "sequence": str(body.get("sequence")),
        "schemaversion": str(version),
    }
    for name, want in expected.items():
        got = attributes.get(name)
        if str(got) != want:
            problems.append(f"ce_{name} is {got!r}, the body says {want!r}")
    if not str(attributes.get("source", "")).startswith("/"):
        problems.append(f"ce_source {attributes.get('source')!r} is not a URI reference")
    try:
        if instant(attributes.get("time")) != instant(body.get("occurred_at")):
            problems.append(f"ce_time {attributes.get('time')} is not occurred_at {body.get('occurred_at')}")
    except ValueError as e:
        problems.append(f"unreadable time: {e}")
    return problems


def check_pipeline(schema_name, value, headers):
    try:
        body = json.loads(value)
    except (TypeError, ValueError) as e:
        return [f"body is not JSON: {e}"]
    problems = schema_errors(SCHEMAS / "pipeline" / schema_name, body)
    if problems:
        return problems
    text = {k: v.decode(errors="replace") for k, v in headers.items() if v is not None}
    for name in ("x-original-topic", "x-attempt", "x-error-class", "x-error-message", "x-first-failure-at"):
        if name not in text:
            problems.append(f"header {name} is missing")
    if schema_name.startswith("ImageJob"):
        if text.get("x-attempt") != str(body["attempt"]):
            problems.append(f"x-attempt {text.get('x-attempt')} is not the job's attempt {body['attempt']}")
        if not text.get("x-due-at", "").isdigit():
            problems.append("x-due-at is not a time in milliseconds")
    else:
        if text.get("x-error-class") != body["failure"]["class"]:
            problems.append(f"x-error-class {text.get('x-error-class')} is not {body['failure']['class']}")
        if text.get("x-attempt") != str(body["attempts"]):
            problems.append(f"x-attempt {text.get('x-attempt')} is not attempts {body['attempts']}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--idle", type=float, default=5.0, help="stop after this long without a message")
    args = parser.parse_args()

    admin = AdminClient({"bootstrap.servers": args.brokers})
    topics = sorted(
        t
        for t in admin.list_topics(timeout=30).topics
        if EVENT_TOPIC.search(t) or RETRY_TOPIC.search(t) or DLQ_TOPIC.search(t)
    )
    if not topics:
        print("conformance: no catalog topics on the broker", file=sys.stderr)
        return 1
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": f"conformance-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer.subscribe(topics)
    counts = {"event": 0, "retry": 0, "dead letter": 0, "fixture": 0}
    failures = []
    seen = set()
    idle_since = None

    while True:
        message = consumer.poll(0.5)
        if message is None:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= args.idle:
                break
            continue
        idle_since = None
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                failures.append(("-", -1, -1, f"consume error: {message.error()}"))
            continue
        where = (message.topic(), message.partition(), message.offset())
        if where in seen:
            continue
        seen.add(where)
        headers = {k: v for k, v in (message.headers() or [])}
        if FIXTURE_HEADER in headers:
            counts["fixture"] += 1
            continue
        topic = message.topic()
        if EVENT_TOPIC.search(topic):
            counts["event"] += 1
            problems = check_event(topic, message.key(), message.value(), headers)
        elif RETRY_TOPIC.search(topic):
            counts["retry"] += 1
            problems = check_pipeline("ImageJob.v1.json", message.value(), headers)
        else:
            counts["dead letter"] += 1
            problems = check_pipeline("DeadLetter.v1.json", message.value(), headers)
        failures += [(*where, p) for p in problems]
    consumer.close()

    checked = counts["event"] + counts["retry"] + counts["dead letter"]
    print(
        f"conformance: {checked} messages on {len(topics)} topics checked "
        f"({counts['event']} events, {counts['retry']} retries, {counts['dead letter']} dead letters; "
        f"{counts['fixture']} deliberate test fixtures skipped), {len(failures)} problems"
    )
    shown = int(os.environ.get("CONFORMANCE_SHOW", "200"))
    for topic, partition, offset, reason in failures[:shown]:
        print(f"  {topic}[{partition}]@{offset}: {reason}")
    if checked == 0:
        print("conformance: nothing was checked", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
