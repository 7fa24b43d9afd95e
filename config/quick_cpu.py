# A quick run on the CPU: a small GPT on tiny Shakespeare, about 2.5 minutes on a 2-core machine
# (val loss 10.8 -> 5.8; its samples have Shakespeare's names, short lines and punctuation).
#   python prepare_data.py --dataset=shakespeare
#   python train.py config/quick_cpu.py --residual=mhc      (or residual, hc)
#   python sample.py --out_dir=out-quick
out_dir = "out-quick"
data_dir = "data/shakespeare"
device = "cpu"
compile = False
eval_interval = 50
eval_iters = 5
log_interval = 10
batch_size = 8
block_size = 64
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
max_iters = 250
warmup_iters = 20
min_lr = 1e-4
