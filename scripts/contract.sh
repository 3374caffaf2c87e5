#!/usr/bin/env bash
# The published event contract against what the system really emits (run by `just test` after the
# test suite, while its broker still holds every message the suite produced):
#   1. events/asyncapi.yaml is valid AsyncAPI, every schema it references resolves (@asyncapi/parser);
#   2. every message on every catalog topic of the broker conforms (scripts/conformance.py: CloudEvents
#      SDK, JSON Schema, key and headers);
#   3. docs/openapi.json (the document the API serves; a unit test keeps it current) is valid OpenAPI 3.1
#      (openapi-spec-validator).
# Tools are installed once into ~/.cache/catalog (a Python virtualenv and an npm package), offline after.
#
#   scripts/contract.sh BROKERS
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
brokers="${1:?usage: scripts/contract.sh BROKERS}"
cache="$HOME/.cache/catalog"
venv="$cache/contract-venv"
if ! "$venv/bin/python" -c 'import cloudevents.v1.kafka, confluent_kafka, jsonschema, openapi_spec_validator' 2>/dev/null; then
    echo "contract: installing the Python checkers (confluent-kafka, cloudevents, jsonschema, openapi-spec-validator)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet confluent-kafka==2.16.1 cloudevents==2.2.0 'jsonschema>=4.20' \
        openapi-spec-validator==0.7.2
fi
npm_dir="$cache/asyncapi"
if [ ! -d "$npm_dir/node_modules/@asyncapi/parser" ]; then
    echo "contract: installing @asyncapi/parser" >&2
    command -v npm >/dev/null || apt-get install -y -qq nodejs npm >/dev/null
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && npm install --silent --no-audit --no-fund @asyncapi/parser@3.6.3 >/dev/null)
fi
NODE_PATH="$npm_dir/node_modules" node "$root/scripts/asyncapi-validate.cjs" "$root/events/asyncapi.yaml"
"$venv/bin/python" "$root/scripts/conformance.py" --brokers "$brokers"
"$venv/bin/python" -m openapi_spec_validator "$root/docs/openapi.json"
