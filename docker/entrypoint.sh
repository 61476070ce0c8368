#!/bin/sh
# Entrypoint of the training image: run the given command in the image's venv, or the launcher
# runtime when no command (or only options) is given: `docker run IMG --config job.yaml`.
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- python -m launcher.runtime "$@"
fi
exec "$@"
