#!/bin/bash
# usage: run.sh LABEL 'JSON' [ENV=VAL ...]
cd /tmp/raystart
label=$1; opts=$2; shift 2
echo "### $label opts=$opts env=$*" >> runs.log
env -u NOSTOP "$@" timeout 300 .venv/bin/python bench.py "$label" "$opts" > logs_$label.txt 2>&1
echo "rc=$?" >> runs.log
grep '^RESULT' logs_$label.txt | cut -c8- | python3 -c "import json,sys
for l in sys.stdin:
  d=json.loads(l); w=d['workers']
  print(f\"{d['label']}: import={d['import_ray_train_torch']} init={d['ray_init']} fit_start={d['t_fit_start']} wproc={[x['worker_proc_start'] for x in w]} first_line={[x['first_line'] for x in w]} prep={[x['after_prepare_model'] for x in w]} FIRST_STEP={d['first_step_max']} fit_total={d['fit_total']} tail={d['fit_end_after_first_step']} shutdown={d['shutdown']} total={d['total_wall']}\")" >> runs.log
# keep controller sys log for breakdown
cp /tmp/ray/session_latest/logs/train/ray-train-sys-controller-*.log ctl_$label.log 2>/dev/null
[ -z "$NOSTOP" ] && .venv/bin/ray stop --force >/dev/null 2>&1
tail -1 runs.log
