# Depth stress at CPU scale: config/depth_gpu.py's 32 layers = 64 sublayers, narrowed to fit a
# laptop (about 10 minutes a run on one core). Same questions, far fewer tokens: see RESULTS.md, "Depth".
#   python prepare_data.py --input=WIKI/wiki_00.txt.xz --blank_line_docs=True --out_dir=data/wiki00
#   python train.py config/depth_cpu.py --residual=hc  --out_dir=out-dcpu-hc
#   python train.py config/depth_cpu.py --residual=mhc --out_dir=out-dcpu-mhc [--res_init=4 | --res_init=8]
data_dir = "data/wiki00"
extra_val = "data/webtext"   # python prepare_data.py --input=webtext.train.jsonl --out_dir=data/webtext
device = "cpu"
compile = False
n_layer = 32
n_head = 2
n_embd = 64
dropout = 0.0
batch_size = 8
block_size = 64
gradient_accumulation_steps = 1   # 512 tokens a step
max_iters = 400
lr_decay_iters = 400
warmup_iters = 40
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 50
eval_iters = 10
log_interval = 10
