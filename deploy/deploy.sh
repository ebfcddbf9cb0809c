#!/usr/bin/env bash
# Deploys TaskService to Cloud Run over end-to-end HTTP/2, with Firestore.
#
#   deploy/deploy.sh --project P --region R [--image IMAGE | --build]
#                    [--service taskservice] [--database '(default)']
#                    [--invoker serviceAccount:caller@P.iam.gserviceaccount.com]...
#                    [--telemetry gcp|off] [--notify projects/P/notificationChannels/N]...
#                    [--dry-run]
#
# Needs gcloud, logged in, and a Python with this repository's deploy extra
# (`pip install -e '.[deploy]'`; PYTHON=path picks one, else python3): both
# are checked before anything is changed.
# What it does, in order (each command is printed before it runs; every one
# is a GA gcloud command, tests/test_deploy.py checks them against gcloud):
#   1. enables the APIs (Cloud Run, Firestore, Artifact Registry, Cloud Build,
#      Cloud Logging, Cloud Monitoring, Cloud Trace, Telemetry);
#   2. creates the runtime service account with roles/datastore.user, and with
#      --telemetry gcp (the default) roles/monitoring.metricWriter and
#      roles/telemetry.tracesWriter to export OpenTelemetry metrics and traces
#      (OTLP to the Telemetry API, telemetry.googleapis.com);
#   3. creates the Firestore database if it is missing, then the composite
#      indexes, index exemptions and the request-id TTL policy
#      (deploy/firestore.indexes.json, via deploy/index_commands.py);
#   4. with --build, builds and pushes the image with Cloud Build;
#   5. renders deploy/service.yaml and runs `gcloud run services replace`
#      (h2c port, gRPC startup/liveness probes; no public access);
#   6. grants roles/run.invoker to each --invoker;
#   7. creates or updates the log-based metrics (calls by method and code,
#      latency), the alert policies (server-side error ratio, p99 latency,
#      instances near max-instances, Firestore errors; each --notify channel
#      is told) and the dashboard, from deploy/monitoring, through the Cloud
#      APIs' client libraries (`deploy/monitoring.py apply`: GA gcloud has no
#      alert policy commands).
# Run it again to update: every step is create-if-missing or an update.
# --dry-run prints the plan (the same lines a real run prints, `A || B`
# where B runs only when A fails) and the rendered files, and runs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
project="" region="" image="" build=0 service="taskservice" database="(default)" dry_run=0
telemetry="gcp" python="${PYTHON:-python3}"
invokers=() channels=()

# The header comment above, up to the first line that is not a comment.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --project) project=${2:?}; shift 2 ;;
    --region) region=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --build) build=1; shift ;;
    --service) service=${2:?}; shift 2 ;;
    --database) database=${2:?}; shift 2 ;;
    --invoker) invokers+=("${2:?}"); shift 2 ;;
    --telemetry) telemetry=${2:?}; shift 2 ;;
    --notify) channels+=("${2:?}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "deploy.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$project" ] && [ -n "$region" ] || { echo "deploy.sh: --project and --region are required" >&2; usage; }
case "$telemetry" in gcp|off) ;; *) echo "deploy.sh: --telemetry must be gcp or off" >&2; usage ;; esac
if [ -z "$image" ]; then
  image="${region}-docker.pkg.dev/${project}/taskservice/${service}:$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo latest)"
fi
sa_name="${service}-run"
sa="${sa_name}@${project}.iam.gserviceaccount.com"

run() {  # prints a command, then runs it unless --dry-run
  printf '+ %s\n' "$(printf '%q ' "$@" | sed 's/ $//')"
  [ "$dry_run" -eq 1 ] || "$@"
}
run_if_absent() {  # CHECK... -- CREATE...: prints `CHECK || CREATE`; runs CREATE when CHECK fails
  local check=() create=()
  while [ "$1" != "--" ]; do check+=("$1"); shift; done; shift; create=("$@")
  printf '+ %s || %s\n' "$(printf '%q ' "${check[@]}" | sed 's/ $//')" "$(printf '%q ' "${create[@]}" | sed 's/ $//')"
  [ "$dry_run" -eq 1 ] && return 0
  "${check[@]}" >/dev/null 2>&1 || "${create[@]}"
}
run_until_visible() {  # like run, but a real run retries while a new service account is not yet visible
  printf '+ %s\n' "$(printf '%q ' "$@" | sed 's/ $//')"
  [ "$dry_run" -eq 1 ] && return 0
  local try err
  for try in 1 2 3 4 5 6 7 8 9 10 11 12; do
    # (stdout is the project's whole IAM policy: not shown)
    if err=$("$@" 2>&1 >/dev/null); then return 0; fi
    grep -qi "does not exist" <<<"$err" || { echo "$err" >&2; return 1; }
    echo "# (IAM does not see the new service account yet: trying again in 5 s, ${try}/12)"
    sleep 5
  done
  echo "$err" >&2
  return 1
}
run_tolerating_exists() {  # an index that already exists is not an error
  printf '+ %s\n' "$*"
  [ "$dry_run" -eq 1 ] && return 0
  local out
  if ! out=$(eval "$*" 2>&1); then
    grep -qi "already exists" <<<"$out" || { echo "$out" >&2; return 1; }
  fi
}

# Before anything changes: what step 7 needs (it runs after the service is live).
if ! "$python" -c 'import google.cloud.logging_v2, google.cloud.monitoring_v3, google.cloud.monitoring_dashboard_v1' 2>/dev/null; then
  echo "deploy.sh: ${python} lacks the Cloud client libraries step 7 uses: pip install -e '.[deploy]' (or set PYTHON)" >&2
  exit 2
fi
if [ "$dry_run" -eq 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  echo "deploy.sh: gcloud is not installed" >&2
  exit 2
fi

echo "# Deploying ${service} to project ${project}, region ${region}"
echo "# image ${image}; runtime service account ${sa}"
[ "$dry_run" -eq 1 ] && echo "# DRY RUN: nothing below is executed"

echo "# 1. APIs"
run gcloud services enable run.googleapis.com firestore.googleapis.com \
  artifactregistry.googleapis.com cloudbuild.googleapis.com logging.googleapis.com \
  monitoring.googleapis.com cloudtrace.googleapis.com telemetry.googleapis.com \
  --project "$project"

echo "# 2. Runtime service account: Firestore access only"
run_if_absent gcloud iam service-accounts describe "$sa" --project "$project" -- \
  gcloud iam service-accounts create "$sa_name" --project "$project" \
  --display-name "TaskService on Cloud Run"
# IAM sees a service account created a moment ago only after seconds (eventual consistency).
run_until_visible gcloud projects add-iam-policy-binding "$project" \
  --member "serviceAccount:${sa}" --role roles/datastore.user --condition None
if [ "$telemetry" = "gcp" ]; then
  for role in roles/monitoring.metricWriter roles/telemetry.tracesWriter; do
    run_until_visible gcloud projects add-iam-policy-binding "$project" \
      --member "serviceAccount:${sa}" --role "$role" --condition None
  done
fi

echo "# 3. Firestore database, indexes, TTL"
run_if_absent gcloud firestore databases describe --database "$database" --project "$project" -- \
  gcloud firestore databases create --database "$database" --location "$region" \
  --type firestore-native --project "$project"
while IFS= read -r cmd; do
  run_tolerating_exists "$cmd"
done < <("$python" "$here/index_commands.py" "$here/firestore.indexes.json" \
          --project "$project" --database "$database")

if [ "$build" -eq 1 ]; then
  echo "# 4. Build and push the image"
  run_if_absent gcloud artifacts repositories describe taskservice --location "$region" --project "$project" -- \
    gcloud artifacts repositories create taskservice --repository-format docker \
    --location "$region" --project "$project"
  run gcloud builds submit "$root" --tag "$image" --project "$project"
fi

echo "# 5. Cloud Run service (end-to-end HTTP/2, no public access)"
rendered=$(mktemp "${TMPDIR:-/tmp}/${service}-service.XXXXXX.yaml")
SERVICE="$service" REGION="$region" PROJECT_ID="$project" IMAGE="$image" \
SERVICE_ACCOUNT="$sa" DATABASE="$database" TELEMETRY="$telemetry" \
"$python" - "$here/service.yaml" "$rendered" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
names = ("SERVICE", "REGION", "PROJECT_ID", "IMAGE", "SERVICE_ACCOUNT", "DATABASE", "TELEMETRY")
text = re.sub(r"\$\{(%s)\}" % "|".join(names), lambda m: os.environ[m.group(1)], text)
left = re.findall(r"\$\{[A-Z_]+\}", text)
if left:
    sys.exit(f"unrendered placeholders: {left}")
open(sys.argv[2], "w").write(text)
PY
echo "# rendered manifest: ${rendered}"
run gcloud run services replace "$rendered" --region "$region" --project "$project"

echo "# 6. Who may call it"
for member in "${invokers[@]}"; do
  run gcloud run services add-iam-policy-binding "$service" --region "$region" \
    --project "$project" --member "$member" --role roles/run.invoker
done
[ ${#invokers[@]} -gt 0 ] || echo "# (no --invoker given: only project owners can call it)"

echo "# 7. Monitoring: log-based metrics, alert policies, dashboard (deploy/monitoring)"
monitoring=$(mktemp -d "${TMPDIR:-/tmp}/${service}-monitoring.XXXXXX")
notify_args=()
for channel in "${channels[@]}"; do notify_args+=(--notify "$channel"); done
"$python" "$here/monitoring.py" render --service "$service" --project "$project" \
  --database "$database" \
  --out "$monitoring" "${notify_args[@]}" | sed 's/^/# rendered /'
echo "# rendered monitoring: ${monitoring}"
run "$python" "$here/monitoring.py" apply --project "$project" "$monitoring"
[ ${#channels[@]} -gt 0 ] || echo "# (no --notify given: the alerts open incidents but tell no one)"

echo "# Call it:"
echo "#   URL=\$(gcloud run services describe ${service} --region ${region} --project ${project} --format 'value(status.url)')"
echo "#   grpcurl -H \"authorization: Bearer \$(gcloud auth print-identity-token)\" \${URL#https://}:443 list"
