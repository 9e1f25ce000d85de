#!/usr/bin/env bash
# Container entrypoint: runs tritonserver on the segmentation model repository with the
# sensitive endpoints (shared memory, model configuration and repository, trace, logging)
# restricted to holders of a token. Extra arguments go to tritonserver.
#
# Environment:
#   SEGSERVE_MODEL_REPOSITORY  model repository (default /models)
#   SEGSERVE_CONFIG            configuration variant: auto (gpu when a GPU is visible, else
#                              default), default, gpu or onnxruntime (--model-config-name)
#   SEGSERVE_TOKEN             token of the restricted endpoints, or SEGSERVE_TOKEN_FILE (a
#                              mounted secret); neither: a random one written to
#                              $HOME/.config/segserve/token (mode 600)
#   SEGSERVE_BIND              listen address (default 0.0.0.0: a container's ports are only
#                              reachable where they are published)
#   SEGSERVE_HTTP_PORT, SEGSERVE_GRPC_PORT, SEGSERVE_METRICS_PORT  (default 8000, 8001, 8002)
#   SEGSERVE_PYTHON_SHM_BYTES  Python backend shared-memory pool and growth step (default 64 MiB)
#   TRITONSERVER               server binary (default tritonserver)
#   SEGSERVE_DRY_RUN=1         print the command instead of running it
set -euo pipefail

# Kept equal to client.auth.RESTRICTED_ENDPOINTS (tests/test_deploy.py checks).
readonly RESTRICTED="shared-memory,model-config,model-repository,trace,logging"

die() { echo "segserve: $*" >&2; exit 2; }

read_token() {
  local token=${SEGSERVE_TOKEN:-}
  if [[ -z $token && -n ${SEGSERVE_TOKEN_FILE:-} ]]; then
    [[ -r $SEGSERVE_TOKEN_FILE ]] || die "SEGSERVE_TOKEN_FILE $SEGSERVE_TOKEN_FILE cannot be read"
    token=$(<"$SEGSERVE_TOKEN_FILE")
  fi
  token=${token//[$'\t\r\n ']/}
  if [[ -z $token ]]; then
    token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    local file=${HOME:-/tmp}/.config/segserve/token
    mkdir -p "$(dirname "$file")"
    (umask 077 && printf '%s\n' "$token" >"$file")
    echo "segserve: no SEGSERVE_TOKEN given; restricted endpoints need the token in $file" >&2
  fi
  [[ $token =~ ^[A-Za-z0-9._~-]+$ ]] || die "the token may hold only letters, digits and . _ ~ -"
  printf '%s' "$token"
}

# The networks the pipelines call by default (each config's "default_network" parameter) that
# the repository lacks, one name per line: a volume mounted over /models without them would
# otherwise load every step, serve nothing and say so only in a model's load error.
missing_networks() {
  local repository=$1 config network
  for config in "$repository"/*/config.pbtxt; do
    [[ -r $config ]] || continue
    network=$(sed -n 's/.*key: *"default_network" *value: *{ *string_value: *"\([^"]*\)".*/\1/p' "$config")
    [[ -z $network ]] && continue
    if [[ ! -r $repository/$network/config.pbtxt ]] || ! compgen -G "$repository/$network/[0-9]*/model.*" >/dev/null; then
      printf '%s\n' "$network"
    fi
  done | sort -u
}

choose_variant() {
  local variant=${SEGSERVE_CONFIG:-auto}
  if [[ $variant == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
      variant=gpu
    else
      variant=default
    fi
  fi
  case $variant in
    default | gpu | onnxruntime) printf '%s' "$variant" ;;
    *) die "SEGSERVE_CONFIG must be auto, default, gpu or onnxruntime, got '$variant'" ;;
  esac
}

main() {
  local repository=${SEGSERVE_MODEL_REPOSITORY:-/models}
  [[ -d $repository ]] || die "model repository $repository does not exist"
  local missing
  missing=$(missing_networks "$repository" | paste -sd, -)
  [[ -z $missing ]] || die "model repository $repository lacks the network(s) $missing: mount a repository exported with \`python -m export\` (docs/deploy.md), or use the image's own /models"
  local hidden
  hidden=$(find "$repository" -mindepth 1 -maxdepth 1 -type d -name '.*' -printf '%f\n' | sort | paste -sd, -)
  # Triton (model control none) takes every directory for a model, hidden ones too.
  [[ -z $hidden ]] || die "model repository $repository holds hidden directories ($hidden), e.g. left by an export that was killed: Triton would take each for a model and fail to start; remove them"
  local bind=${SEGSERVE_BIND:-0.0.0.0} shm=${SEGSERVE_PYTHON_SHM_BYTES:-67108864}
  local token variant
  token=$(read_token)
  variant=$(choose_variant)
  local rule="$RESTRICTED:segserve-token=$token"
  local command=(
    "${TRITONSERVER:-tritonserver}"
    "--model-repository=$repository"
    "--http-address=$bind" "--http-port=${SEGSERVE_HTTP_PORT:-8000}"
    "--grpc-address=$bind" "--grpc-port=${SEGSERVE_GRPC_PORT:-8001}"
    "--metrics-address=$bind" "--metrics-port=${SEGSERVE_METRICS_PORT:-8002}"
    "--model-control-mode=none" "--strict-readiness=true" "--exit-timeout-secs=30"
    "--backend-config=python,shm-default-byte-size=$shm" "--backend-config=python,shm-growth-byte-size=$shm"
    "--grpc-restricted-protocol=$rule" "--http-restricted-api=$rule"
  )
  [[ $variant == default ]] || command+=("--model-config-name=$variant")
  command+=("$@")
  if [[ ${SEGSERVE_DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "${command[@]}"
    return 0
  fi
  echo "segserve: configuration variant $variant, listening on $bind" >&2
  exec "${command[@]}"
}

main "$@"
