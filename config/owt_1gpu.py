# One GPU on OpenWebText: GPT-2 124M, 0.5M tokens a step by gradient accumulation, for a day.
#   python prepare_data.py --dataset=openwebtext
#   python train.py config/owt_1gpu.py --residual=mhc      (or residual, hc)
out_dir = "out-owt"
data_dir = "data/openwebtext"
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32  # 16 x 1024 x 32 = 524,288 tokens a step
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 1000
eval_interval = 500
eval_iters = 100
log_interval = 10
