#!/bin/sh
# mailgate container entrypoint.
# 1. Secrets from files: for every VAR_FILE=/path (compose or Kubernetes secrets mounted as
#    files) VAR is set from the file's content, unless VAR is already set.
# 2. No arguments: run the image's service (mailgate-$SERVICE); otherwise run the arguments
#    (e.g. `mailgate-ledger bootstrap`, `mailgate accounts list`).
set -eu

for name in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)_FILE=.*/\1/p'); do
    eval "file=\${${name}_FILE}"
    eval "current=\${${name}:-}"
    if [ -z "${current}" ]; then
        if [ ! -r "${file}" ]; then
            echo "mailgate-entrypoint: ${name}_FILE=${file} is not a readable file" >&2
            exit 2
        fi
        value="$(cat "${file}")"
        export "${name}=${value}"
    fi
    unset "${name}_FILE"
done

if [ "$#" -eq 0 ]; then
    case "${SERVICE:-}" in
        fakes) set -- mailgate-postal-sandbox ;;
        cli) set -- mailgate --help ;;
        "") echo "mailgate-entrypoint: SERVICE is not set" >&2; exit 2 ;;
        *) set -- "mailgate-${SERVICE}" ;;
    esac
fi
exec "$@"
