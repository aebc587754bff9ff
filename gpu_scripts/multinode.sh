#!/usr/bin/env bash
# One node of a multi-node run: start it on every node with the same settings but its own
# --node-rank. torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT (a process on the node whose
# address that is hosts it) gathers the nodes; DDP over NCCL.
#
# Usage: gpu_scripts/multinode.sh --nnodes N --node-rank R --master-addr HOST [options] [key.sub=value ...]
#   --nnodes N         NNODES        number of nodes
#   --node-rank R      NODE_RANK     this node, 0..N-1 (0 on the MASTER_ADDR node)
#   --master-addr H    MASTER_ADDR   host name or IP of the rendezvous node, reachable from all
#   --master-port P    MASTER_PORT   its TCP port (default 29500)
#   --job-id ID        JOB_ID        rendezvous id, the same on every node (default xla-trainer)
#   --gpus N           GPUS          processes per node (default: the GPUs nvidia-smi -L lists;
#                                    1 in a dry run without nvidia-smi)
#   --config FILE      CONFIG        experiment YAML, relative to the repository root
#                                    (default configs/digpt/demo.yaml)
#   --dry-run          DRY_RUN=1     print each command (prefixed with "+ ") and run none
#   -h, --help                       this text
#   key.sub=value                    config overrides, passed on (the last value of a key wins)
# Flags win over the environment variables beside them. Example, on the second of two nodes:
#   gpu_scripts/multinode.sh --nnodes 2 --node-rank 1 --master-addr node0 \
#     --config configs/digpt/vit_b16_in1k.yaml data.root=/data/imagenet train.output_dir=/shared/run1

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "nnodes=NNODES node-rank=NODE_RANK master-addr=MASTER_ADDR master-port=MASTER_PORT
  job-id=JOB_ID gpus=GPUS config=CONFIG" "$@"
shift "$PARSED"
require NNODES --nnodes
require NODE_RANK --node-rank
require MASTER_ADDR --master-addr
GPUS=${GPUS:-$(gpu_count)}
run cd "$ROOT"
run torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_backend=c10d \
  --rdzv_id="${JOB_ID:-xla-trainer}" --nproc_per_node="$GPUS" -m xla_trainer pretrain \
  --config "${CONFIG:-$DEFAULT_CONFIG}" runtime.backend=cuda "$@"
