#!/usr/bin/env bash
# End-to-end on a kind cluster: the image built from the Dockerfile, the Helm chart, Kafka and an
# S3 server inside the cluster, and example StreamJobs whose output topics the tests check.
#
#   tests/e2e/kind/run-kind-e2e.sh          check, up, run the tests, delete the cluster
#                                           (WEIR_E2E_KEEP=1 keeps it for another run)
#   tests/e2e/kind/run-kind-e2e.sh check    print what is missing (one line) and exit 3, or exit 0
#   tests/e2e/kind/run-kind-e2e.sh up       create/reuse the cluster, build + load the image,
#                                           install Kafka, S3 and the chart (idempotent)
#   tests/e2e/kind/run-kind-e2e.sh test     pytest tests/e2e/kind (its fixture runs `up` itself)
#   tests/e2e/kind/run-kind-e2e.sh down     delete the cluster
#   tests/e2e/kind/run-kind-e2e.sh env      print KUBECONFIG, NAMESPACE, IMAGE, BUCKET as KEY=VALUE
#
# The cluster's kubeconfig is written to $WEIR_E2E_KUBECONFIG, never into ~/.kube/config.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
CACHE="${WEIR_CACHE:-$HOME/.cache/weir}"
CLUSTER="${WEIR_E2E_CLUSTER:-weir-e2e}"
NAMESPACE="${WEIR_E2E_NAMESPACE:-weir-e2e}"
IMAGE="${WEIR_E2E_IMAGE:-weir:e2e}"
CHART="${WEIR_E2E_CHART:-$ROOT/charts/weir-operator}"
export KUBECONFIG="${WEIR_E2E_KUBECONFIG:-$CACHE/run/kind/$CLUSTER.kubeconfig}"
# In-cluster servers: pinned images, overridable for mirrors.
KAFKA_IMAGE="${WEIR_E2E_KAFKA_IMAGE:-apache/kafka:3.9.1}"
S3_IMAGE="${WEIR_E2E_S3_IMAGE:-minio/minio:RELEASE.2025-04-22T22-12-26Z}"
BUCKET="${WEIR_E2E_BUCKET:-weir-e2e}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '\033[1mkind-e2e:\033[0m %s\n' "$*" >&2; }
# A Docker CLI with no reachable engine can hang for a long time; coreutils' timeout bounds it.
bounded() { if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi; }

# Everything that is missing, as one line on stdout; nothing when all is there.
missing() {
  local gaps=() tool err
  for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null 2>&1 || gaps+=("\`$tool\` on PATH")
  done
  if command -v docker >/dev/null 2>&1 \
      && ! err="$(bounded 30 docker info --format '{{.ServerVersion}}' 2>&1 >/dev/null)"; then
    gaps+=("a running Docker engine (docker info: $(tr '\n' ' ' <<<"$err" | cut -c1-120 | sed 's/ *$//'))")
  fi
  [ -f "$ROOT/Dockerfile" ] || gaps+=("the Dockerfile (not written yet)")
  [ -f "$CHART/Chart.yaml" ] || gaps+=("the chart ${CHART#"$ROOT"/} (not written yet)")
  if [ ${#gaps[@]} -gt 0 ]; then
    local IFS=';'
    echo "kind e2e needs ${gaps[*]}" | sed 's/;/; /g'
  fi
}

cmd_check() {
  local what
  what="$(missing)"
  if [ -n "$what" ]; then echo "$what"; exit 3; fi
}

cmd_up() {
  cmd_check
  mkdir -p "$(dirname "$KUBECONFIG")"
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "reusing kind cluster $CLUSTER"
    kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG" >/dev/null
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s
  fi

  log "building $IMAGE from $ROOT/Dockerfile"
  docker build -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
  kind load docker-image "$IMAGE" --name "$CLUSTER"

  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  log "starting Kafka ($KAFKA_IMAGE) and S3 ($S3_IMAGE) in namespace $NAMESPACE"
  sed -e "s|__KAFKA_IMAGE__|$KAFKA_IMAGE|" "$HERE/manifests/kafka.yaml" | kubectl -n "$NAMESPACE" apply -f -
  sed -e "s|__S3_IMAGE__|$S3_IMAGE|" "$HERE/manifests/s3.yaml" | kubectl -n "$NAMESPACE" apply -f -
  kubectl -n "$NAMESPACE" rollout status statefulset/kafka --timeout=300s
  kubectl -n "$NAMESPACE" rollout status deployment/s3 --timeout=300s
  # The bucket is made with the weir image itself (it has boto3), so no extra client image is needed.
  kubectl -n "$NAMESPACE" delete job make-bucket --ignore-not-found >/dev/null
  kubectl -n "$NAMESPACE" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: make-bucket
spec:
  backoffLimit: 6
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: make-bucket
          image: $IMAGE
          imagePullPolicy: Never
          envFrom: [{secretRef: {name: s3-credentials}}]
          env: [{name: BUCKET, value: "$BUCKET"}]
          command:
            - python
            - -c
            - |
              import os, boto3
              s3 = boto3.client("s3", endpoint_url="http://s3:9000", region_name="us-east-1")
              if os.environ["BUCKET"] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
                  s3.create_bucket(Bucket=os.environ["BUCKET"])
EOF
  kubectl -n "$NAMESPACE" wait job/make-bucket --for=condition=Complete --timeout=180s

  log "installing the chart $CHART"
  local repo="${IMAGE%:*}" tag="${IMAGE##*:}"
  # shellcheck disable=SC2086 # WEIR_E2E_HELM_ARGS is a list of extra arguments on purpose
  helm upgrade --install weir-operator "$CHART" --namespace "$NAMESPACE" \
    --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=Never \
    ${WEIR_E2E_HELM_ARGS:-} --wait --timeout 5m
  log "ready: export KUBECONFIG=$KUBECONFIG (namespace $NAMESPACE)"
}

# The settings the tests need, as KEY=VALUE lines (the tests read them instead of repeating defaults).
cmd_env() {
  printf '%s\n' "KUBECONFIG=$KUBECONFIG" "NAMESPACE=$NAMESPACE" "IMAGE=$IMAGE" "BUCKET=$BUCKET"
}

cmd_test() {
  cmd_check
  "$PYTHON" -m pytest "$HERE" -p no:cacheprovider "$@"
}

cmd_down() {
  command -v kind >/dev/null 2>&1 || exit 0
  kind delete cluster --name "$CLUSTER"
  rm -f "$KUBECONFIG"
}

case "${1:-all}" in
  check) cmd_check ;;
  env) cmd_env ;;
  up) cmd_up ;;
  test) shift; cmd_test "$@" ;;
  down) cmd_down ;;
  all)
    cmd_check
    status=0
    cmd_test || status=$?
    [ "${WEIR_E2E_KEEP:-0}" = 1 ] || cmd_down
    exit "$status"
    ;;
  *) echo "usage: $0 [all|check|up|test|down|env]" >&2; exit 2 ;;
esac
