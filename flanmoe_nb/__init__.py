"""Instruction-tuned sparse Mixture-of-Experts (FLAN-MoE) workspace: nbdev notebooks, a compiled MoE core, papermill experiments

Modules:

- `flanmoe_nb.analysis`: Expert specialisation: routing tables per task cluster, mutual information between cluster and expert with a shuffled-cluster control, heatmaps, and its course over training stages.
- `flanmoe_nb.batches`: Resumable streams of micro-batches: a seeded per-epoch order sharded over data-parallel ranks, optional length bucketing, and the position a checkpoint stores.
- `flanmoe_nb.bench`: `flanmoe bench moe`: this project's MoE FFN against a dense FFN of equal active FLOPs (the limit), the HF Switch Transformers MLP, a GShard one-hot einsum dispatch and `torch._grouped_mm`, side by side.
- `flanmoe_nb.checkpoint`: Atomic, resumable training checkpoints: weights as safetensors, trainer state as JSON, one weights-only rank file per process; a crash never leaves a half-written one, and reading never runs code.
- `flanmoe_nb.collate`: Padded torch batches from token rows (T5's shifted decoder inputs, segment ids for packed rows), length-bucketed batching and T5-style packing.
- `flanmoe_nb.corpus`: English prose shipped with Python (and any local text) for pretraining, and T5 span corruption: the noise mask, sentinel inputs and targets, and the lengths they need.
- `flanmoe_nb.data`: The data pipeline's configuration and builders: one `DataConfig` with presets, an Arrow cache keyed by config, and the tokenized instruction mixture, task splits, eval prompts and pretraining corpus.
- `flanmoe_nb.ds`: The DeepSpeed engine of a training stage: its config, ZeRO 1/2 over the dense parameters, and the hand-over of our expert-parallel layout to DeepSpeed's MoE groups so ZeRO partitions expert state per group.
- `flanmoe_nb.eval`: Answer normalisation, exact match and task scorers, rank classification over answer options, greedy-generation evaluation, few-shot prompts, and per-task / per-cluster / held-out aggregates.
- `flanmoe_nb.experiment`: One stage of an experiment end to end: its data and model (fresh, or the starting run's checkpoint), training in this process or under a launcher, and `eval.json` with expert specialisation.
- `flanmoe_nb.extension`: Loading the compiled extension `flanmoe_nb._C`, its host memory cache, and the choice of a kernel path by measurement, per machine.
- `flanmoe_nb.gemm`: The expert products: `grouped_mm` and its weight gradient, the CPU kernels that run them and how a path is chosen per shape, and the dense products on the same kernels.
- `flanmoe_nb.grid`: `papermill_runs/*.yaml` parsed into checked run specs: products of parameters, `${run_id}` stage dependencies in run order, the setup notebooks' parameter schemas, and notebook copies for papermill.
- `flanmoe_nb.hf`: Convert transformers' `T5ForConditionalGeneration` and `SwitchTransformersForConditionalGeneration` to and from our `EncoderDecoder`, with logit, routing and round-trip parity.
- `flanmoe_nb.kernels`: Every compiled op of the extension and its pure-PyTorch twin in one namespace, `import flanmoe_nb.kernels as K`: the MoE ops, the grouped GEMM, the T5 layer ops and the extension's controls.
- `flanmoe_nb.launch`: Training a stage on several processes or nodes: `torchrun` (one node, or one per node of a hostfile, by ssh), the DeepSpeed launcher with its hostfile, and a Slurm batch script.
- `flanmoe_nb.layer_ops`: The T5 layer's own ops: dropout, attention with a learned bias, RMS norm and token cross-entropy, each one compiled op per direction on CPU, with its pure-PyTorch twin.
- `flanmoe_nb.mixture`: Examples-proportional mixing with a cap, and the held-out clusters of setup (ii) with the check that none of their tasks, clusters or questions reach a training split.
- `flanmoe_nb.model`: T5-style encoder-decoder, dense or with MoE in every `sparse_step`-th FFN: config, modules in data-flow order, loss with router losses, greedy generation with a KV cache, FLOPs/parameter counter and sparse upcycling.
- `flanmoe_nb.moe`: `MoEConfig`, the sparse `MoELayer` (router + expert bank on the grouped-GEMM kernels), the dense FFN it replaces, sparse upcycling, and a per-token reference implementation.
- `flanmoe_nb.moe_ops`: The sparse layer's own ops: the routing plan, permute and unpermute, the expert FFN and the whole softmax top-k MoE FFN, each with its pure-PyTorch twin.
- `flanmoe_nb.optim`: Freezing knobs, parameter groups with the experts on their own, Adafactor per expert (T5 / FLAN) or fused AdamW, and the learning-rate schedules.
- `flanmoe_nb.parallel`: One process per device (torchrun or the deepspeed launcher), expert-parallel MoE layers whose tokens travel by all-to-all with variable splits, gradient sync, and world-size-free state dicts.
- `flanmoe_nb.params`: Every setup notebook's parameters declared once (default, allowed values, meaning, setups), the grid's MoE block, and the model configuration and loss settings they give a stage.
- `flanmoe_nb.plan`: Before a job is queued: does a preset fit N GPUs on M nodes, what will its memory, FLOPs and all-to-all cost per device, and about how long will a step take? `flanmoe plan` answers from the project's own model definition, and every figure is checked against a measurement or a published formula.
- `flanmoe_nb.results`: The lab book: every run folder into one table, the tidy `results.csv`, comparisons with the committed results, exports of finished runs, and the training plots of the setup notebooks.
- `flanmoe_nb.routing`: Routers for sparse MoE layers: token-choice top-k (Switch, GShard, ST-MoE) and expert choice, expert capacity, and the load-balancing and z auxiliary losses.
- `flanmoe_nb.runs`: The papermill grid runner: grid files in `papermill_runs/*.yaml`, one executed notebook per parameter set, dependencies between stages, skip-if-done, failures kept with their traceback, and the results table.
- `flanmoe_nb.stats`: The statistics of the results notebook: mean and Student-t interval over seeds, paired bootstrap, exact sign and McNemar tests over shared test items, verdicts on the paper's signs, baseline margins.
- `flanmoe_nb.tasks`: The offline FLAN tasks: reasoning-gym generators in clusters, their splits and scorers, the natural-language templates and answer options of each prompt, and local FLAN-format files.
- `flanmoe_nb.tokenizer`: A byte-level BPE tokenizer trained locally with HF `tokenizers`, with T5's ids (pad 0, eos 1, unk 2) and the `<extra_id_*>` sentinels at the top of the vocabulary.
- `flanmoe_nb.train`: A plain training loop: Adafactor/AdamW, warmup schedules, clipping and accumulation, bf16 autocast, freezing knobs, NaN guards, atomic checkpoints with exact resume, expert parallelism and a DeepSpeed path."""

__version__ = "0.1.0"
