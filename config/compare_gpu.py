# The residual vs HC vs mHC comparison on one GPU (H100/H200), a few minutes a run:
# GPT-2 small's shape on ~21M tokens of English Wikipedia, WebText as a second validation set
# (RESULTS.md says what the data is and how to get it; WIKI/ is a folder of WikiExtractor text).
#   python prepare_data.py --input='WIKI/wiki_*.txt.xz' --blank_line_docs=True --out_dir=data/wiki
#   python prepare_data.py --input=webtext.train.jsonl --out_dir=data/webtext
#   python train.py config/compare_gpu.py --residual=mhc --out_dir=out-cmp-mhc     (and residual, hc, mhc_lite)
# (On OpenWebText instead: --data_dir=data/openwebtext and drop extra_val.)
# (RESULTS.md's runs kept the stream in fp32: add --stream_dtype=float32 to repeat them exactly.)
data_dir = "data/wiki"
extra_val = "data/webtext"
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 1   # 16,384 tokens a step
max_iters = 1300                  # ~21M tokens, about one pass over the Wikipedia text
lr_decay_iters = 1300
warmup_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 100
eval_iters = 20
log_interval = 10
seed = 1337
