# The residual vs HC vs mHC comparison at CPU scale: config/compare_gpu.py's recipe on a 6-layer,
# 128-wide GPT and 200k tokens (about 10 minutes a run on one core). See RESULTS.md.
#   python prepare_data.py --input=WIKI/wiki_00.txt.xz --blank_line_docs=True --out_dir=data/wiki00
#   python prepare_data.py --input=webtext.train.jsonl --out_dir=data/webtext
#   python train.py config/compare_cpu.py --residual=mhc --out_dir=out-ccpu-mhc     (and residual, hc, mhc_lite)
data_dir = "data/wiki00"
extra_val = "data/webtext"
device = "cpu"
compile = False
n_layer = 6
n_head = 4
n_embd = 128
dropout = 0.0
batch_size = 4
block_size = 128
gradient_accumulation_steps = 1   # 512 tokens a step
max_iters = 400
lr_decay_iters = 400
warmup_iters = 40
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 50
eval_iters = 10
log_interval = 10
seed = 1
