# Depth stress (where HC breaks and mHC holds): 32 narrow layers = 64 sublayers, one GPU.
#   python train.py config/depth_gpu.py --residual=hc  --out_dir=out-depth-hc
#   python train.py config/depth_gpu.py --residual=mhc --out_dir=out-depth-mhc [--res_init=4 | --res_init=8]
# (data as in config/compare_gpu.py; repeat with --seed=... for the seed spread)
# (RESULTS.md's runs kept the stream in fp32: add --stream_dtype=float32 to repeat them exactly.)
data_dir = "data/wiki"
extra_val = "data/webtext"
n_layer = 32
n_head = 4
n_embd = 256
batch_size = 32
block_size = 512
gradient_accumulation_steps = 1   # 16,384 tokens a step
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 100
eval_iters = 20
log_interval = 10
