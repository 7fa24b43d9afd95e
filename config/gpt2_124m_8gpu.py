# nanoGPT's GPT-2 124M run on OpenWebText, on one node of 8 GPUs (~300B tokens, ~4-5 days on A100s):
#   python prepare_data.py --dataset=openwebtext
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_8gpu.py --residual=mhc
# 12 x 1024 x 40 = 491,520 tokens a step, 5 micro-steps on each of the 8 GPUs.
out_dir = "out-gpt2"
data_dir = "data/openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 1000
eval_iters = 200
log_interval = 10
