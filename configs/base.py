"""Defaults for every ArcScale experiment.

A job config (e.g. ``configs/ms1mv3_r50.py``) defines ``config = edict()`` and sets
only what differs; ``utils.config.load.load_config`` layers it over this file. A key that
is not defined here is rejected, so every knob the trainer reads is listed below.
"""
from easydict import EasyDict as edict

config = edict()

# ---------------------------------------------------------------- experiment
config.output = None            # run folder; None -> work_dirs/<config file stem>. A run locks it (.arcscale.lock: host, pid) while it lives; a second run into it stops with one line
config.seed = 2048              # seeds torch/numpy/random, the sampler and the workers
config.device = "auto"          # auto | cuda | npu | cpu
config.resume = False           # False | True (continue from the newest checkpoint; error if none) | "auto" (resume when one exists: elastic restarts)
config.overwrite = False        # allow a fresh run into an `output` holding checkpoints/model.pt (they are deleted first)
config.resume_data_changed = False  # resume although the data differs from the checkpoint's (its images, classes or index hash): logged; False refuses with one line. Another class count is always refused (the head has a row per class)
config.init_backbone = None     # a backbone/model.pt path, or a released name ("facenet:vggface2", "insightface:ms1mv3_r50": python tools/weights.py list, docs/weights.md) to start from (fine-tuning); names are fetched into $ARCSCALE_CACHE (default ~/.cache/arcscale). A missing file is refused before any data, naming this key and the path looked at
# Fine-tuning (docs/training.md, "Fine-tuning"): a fresh head for the new identities is the default (a
# facenet-style file's `logits` is reused by head="softmax" when its shape matches).
config.head_only_epochs = 0     # train the head alone for the first N epochs: the backbone runs in eval mode without gradients (weights and BatchNorm statistics untouched, no optimizer state for it), then is unfrozen at the epoch boundary; a run that ends inside this phase leaves the backbone bit-identical to its init
config.freeze_bn = False        # every BatchNorm of the backbone in eval mode throughout: running statistics never change (its affine weights still train); works with DDP, AMP and gradient_acc
config.backbone_lr_scale = 1.0  # the backbone's learning rate relative to the head's (0.1: the backbone learns at a tenth of the schedule's lr); 0 = backbone weights fixed; a resume may change it (and freeze_stages, head_only_epochs): every parameter keeps its optimizer state
config.freeze_stages = 0        # the first K stages of the backbone frozen for the whole run (weights and BatchNorm statistics): iresnet 4 (stem+layer1, layer2, layer3, layer4), mbf 4 (each ends before a downsample), inception_resnet_v1 4 (stem, repeat_1, mixed_6a+repeat_2, mixed_7a+repeat_3+block8), tiny 5 (its conv blocks); the embedding layer always trains
config.log_level = "INFO"

# ---------------------------------------------------------------- knowledge distillation (distill.py, docs/training.md)
config.teacher = None           # None | dict(network="r50", weights=<backbone file or released name>): a frozen teacher (eval mode, no gradients, the run's autocast, each rank's own batch in its own input convention; its embedding size comes from the file, which is only read). Adds kd_weight x kd_loss to the loss
config.kd_loss = "cosine"       # cosine | l2 | relation. cosine: 1 - cos(P s, t); l2: ||P s - t||^2 (raw embeddings); P = a trained linear projection student -> teacher size when they differ (in checkpoints, not in model.pt). relation: MSE of the batch's pairwise cosine-similarity matrices (no projection)
config.kd_weight = 1.0          # weight of the distillation term in the loss (the term is logged unweighted as "kd")

# ---------------------------------------------------------------- data
# rec: a folder with train.rec/train.idx, an image folder root/<identity>/<image>, "random" (random
# tensors, for speed tests), or "synthetic": arcface_torch's spelling of "random", except that with
# synthetic.num_identities > 0 it means the generated identity set below.
# Several sources (docs/data.md, "Several sources"): a list of such folders, sharded packs (a folder of
# train_0.rec/.idx ... train_<N-1>) or globs ("/data/wf/train_*.rec"), read as one dataset without copying;
# source i's labels are offset by the classes of the sources before it (a table at start says which).
config.rec = "synthetic"
config.rec_weights = None       # several sources: each source's share of every epoch's samples, one number > 0 per entry of rec (normalised); None = in proportion to its images (a plain shuffle of the union); with sampler="pk": each source's share of the P x K identity groups
config.rec_identity_map = None  # several sources: a CSV file of source,label,global_id rows merging identities that occur in several sources (source = the rec entry as written, or its position); None = all distinct
config.num_classes = None       # read from the data; a value that disagrees is an error
config.num_image = None         # read from the data; a value that disagrees is an error
config.image_size = (112, 112)  # (height, width) the backbone sees
config.num_workers = 2          # DataLoader workers per rank
config.skip_bad_records = True  # skip (and count) corrupt records instead of dying
config.max_bad_records = 0.001  # corrupt records skipped before the run stops with an error: below 1 a fraction of the
                                # data but at least 10 records (max(0.1% x images, 10): small sets survive a bad
                                # image or two); a whole number >= 1 a count (5 = at most 5 records); 0 = none
config.synthetic = edict(       # the generated identity set (used when rec = "synthetic")
    num_identities=0,           # 0 = no generated identity set
    images_per_identity=0,
    num_val_identities=0,       # unseen identities for the verification pairs
    num_val_pairs=0,
    cache_dir=None,             # where the set is written once and reused
)
config.dali = False             # accepted for arcface_torch configs; ArcScale has no DALI reader: True is an error
config.dali_aug = False         # accepted for arcface_torch configs; True is an error (no DALI reader)

# ---------------------------------------------------------------- backbone
config.network = "r50"          # see backbones.get_model: r18..r200, mbf, mbf_large, vit_*
config.embedding_size = 512     # num_features of the backbone
config.dropout = 0.0
config.gradient_checkpointing = False
config.channels_last = False    # NHWC memory format for conv backbones

# ---------------------------------------------------------------- head (losses.py / partial_fc.py)
config.head = "combined"        # combined (ArcFace/CosFace/...) | adaface | curricularface | softmax (linear + bias + cross-entropy, softmax_head.py: facenet fine-tuning)
config.margin_list = (1.0, 0.5, 0.0)    # (m1, m2, m3): cos(m1*theta + m2) - m3
config.scale = 64.0             # s: logits are multiplied by it
config.margin_grad = "straight_through"  # straight_through (arcface_torch) | exact
config.interclass_filtering_threshold = 0.0
config.sample_rate = 1.0        # Partial FC: fraction of local class centers sampled per step
config.pfc_update = "sparse"    # sparse (PFC v1: only sampled rows move) | dense (arcface_torch v2)
config.pfc_weight_dtype = "float32"  # float32 | bfloat16 (stochastic rounding; ~2x the classes per GiB)
config.pfc_state_dtype = "float32"   # optimizer rows of the head: float32 | bfloat16 | int8 (SGD momentum, per-row scale)

# ---------------------------------------------------------------- optimisation
config.optimizer = "sgd"        # sgd | adamw | adam
config.lr = 0.1                 # base lr for the global batch (ignored when lr_per_512 is set)
config.lr_per_512 = None        # lr per 512 global samples; lr = lr_per_512 * global_batch / 512
config.momentum = 0.9
config.weight_decay = 5e-4
config.adam_betas = (0.9, 0.999)
config.adam_eps = 1e-8
config.batch_size = 128         # per rank, per micro-step
config.gradient_acc = 1         # micro-steps per optimizer step
config.num_epoch = 20
config.warmup_epoch = 0         # linear warmup length, in epochs
config.lr_schedule = "poly"     # poly (warmup + polynomial decay, arcface_torch) | step (MultiStepLR at lr_steps)
config.lr_power = 2.0           # polynomial decay power (arcface_torch: 2)
config.lr_steps = ()            # lr_schedule="step": epochs at which lr is multiplied by lr_gamma (facenet: (5, 10))
config.lr_gamma = 0.1           # lr_schedule="step": the factor per milestone
config.clip_grad_norm = 5.0     # backbone grad-norm clip; 0 = off
config.max_steps = None         # stop after this many optimizer steps; the whole LR schedule (warmup, lr_steps, decay) is compressed to fit them
config.max_nonfinite_steps = 20 # abort after this many non-finite losses in a row
# When training blows up (utils/run/divergence.py; docs/training.md "Divergence"). The detectors judge values every
# rank shares (the loss and the embeddings' similarity averaged over ranks in the optimizer's all-reduce, the fp16
# scale), so all ranks fire at the same step; each signal is one log line with its numbers and a TensorBoard scalar.
config.on_divergence = "rollback"   # rollback | stop | warn. Default rollback: the detectors stay quiet on healthy runs (tested
                                    # on the demo), the snapshot costs < 1% of a step (docs/benchmarks.md), and a diverged run
                                    # otherwise trains on to a useless model (warn) or dies where a lower LR would have saved
                                    # it (stop). "stop": one error line naming the step and the signal, exit 2 (no checkpoint
                                    # of the diverged state). "warn": one warning per signal, training goes on. A run of
                                    # max_nonfinite_steps non-finite losses stops under warn and stop, rolls back under rollback
config.max_rollbacks = 3            # rollbacks in a run (checkpointed: a resume counts on); one more divergence stops the run with one line listing each
config.snapshot_every_steps = 25    # rollback: the in-memory (host RAM) copy of backbone, head rows, optimizer state and scaler is
                                    # refreshed at the first healthy step (no detector counting, loss not elevated) after every N steps;
                                    # also taken before the run's first step (and after a resume)
config.divergence_lr_factor = 0.1   # rollback: the LR is multiplied by this for the rest of the run, once per rollback (cumulative, checkpointed)
config.divergence_warmup_steps = 20 # spike, rise and collapse are judged after this many finite steps (since the start; checkpointed)
config.divergence_spike_factor = 6.0  # spike: the step's loss above the median of the last 50 finite losses by this x their spread (1.4826 x MAD, >= 1% of the post-warm-up loss)
config.divergence_rise_margin = 0.1   # rise: the smoothed loss (EMA 0.9) above its running minimum by this x its level after warm-up ...
config.divergence_rise_window = 10    # ... for this many steps in a row
config.divergence_scale_floor = 1.0   # fp16: the grad scale below this ...
config.divergence_scale_window = 20   # ... for this many steps in a row
config.divergence_collapse_threshold = 0.95  # collapse: mean cosine similarity between different embeddings of the batch at or above this
config.divergence_relapse_margin = 0.05  # relapse: on probation (the first divergence_warmup_steps finite steps after a rollback)
                                        # the smoothed loss, started at the restored state's loss level, above that level by more
                                        # than this x it: the lowered LR still makes things worse, so it is cut again at once

# ---------------------------------------------------------------- precision and DDP
config.fp16 = False             # autocast fp16 + GradScaler (apex O1 equivalent)
config.bf16 = False             # autocast bf16 (no scaler)
config.fp16_grad_compression = False  # CUDA/NPU: DDP gradient buckets travel as fp16 (divided by the world size first, summed, multiplied back); not with bf16; off on CPU
config.static_graph = True      # DDP static graph: the same parameters get gradients every step; used only with gradient_acc=1 (torch's static graph breaks under no_sync, pytorch#143580)
config.cudnn_benchmark = True   # CUDA: torch.backends.cudnn.benchmark (fixed 112x112 inputs: the fastest conv algorithms are timed once, then reused)
config.allow_tf32 = False       # fp32 matmuls (the head's logits GEMMs, linear layers) in TF32 on CUDA (torch.backends.cuda.matmul.allow_tf32), HF32 on Ascend (torch.npu.matmul.allow_hf32); False keeps them exact fp32 (torch's default); convolutions keep torch's own default
config.collective_timeout_s = 1800  # several ranks: seconds a rank may be missing (stopped, hung, gone) before the
                                    # run ends with one error line naming it (exit 2), warnings before; the process
                                    # group's own timeout is 60 s longer (utils/run/watchdog.py)

# ---------------------------------------------------------------- logging, eval, checkpoints
config.frequent = 10            # a step interval (arcface_torch's name): log every N optimizer steps
config.verbose = 2000           # a step interval (arcface_torch's name): verify every N optimizer steps; 0 = at the end
config.val_targets = []         # stems of <val_data_dir>/<target>.bin
config.val_data_dir = None      # None -> the data folder (cfg.rec)
config.val_batch_size = 256
config.verify_at_start = False  # also verify the untrained model (a baseline for the curve)
config.tensorboard = True
config.using_wandb = False      # key from WANDB_API_KEY in the environment
config.wandb_project = "arcscale"
config.wandb_entity = None
config.wandb_run_name = None
config.save_every_steps = 0     # also checkpoint every N optimizer steps (0 = per epoch only)
config.keep_checkpoints = 3     # newest checkpoints kept in `output` (the one just written is never pruned)
config.on_save_error = "stop"   # a checkpoint or model.pt write that fails (full disk, quota, permissions): stop (one-line error) | warn (one warning, train on). Either way a run whose final save fails exits 2 saying what is on disk
config.save_all_states = True   # accepted for arcface_torch configs, not read: checkpoints always hold all states
# arcface_torch's wandb_key, suffix_run_name, wandb_log_all, save_artifacts and wandb_resume are not keys here:
# a config that sets them loads, with one warning naming them (utils/config/rules.py ARCFACE_ONLY_KEYS)

# ---------------------------------------------------------------- metric learning (metric_losses.py, FaceNet)
config.loss = "margin"          # margin (the head above: Partial FC margins / softmax) | triplet (TripletLoss, no classifier)
config.triplet_margin = 0.2     # alpha in max(d(a,p) - d(a,n) + alpha, 0); FaceNet: 0.2 (squared distances)
config.triplet_mining = "semihard"  # semihard (FaceNet / TF rule) | batch_hard (Hermans et al.) | all (mean of active triplets)
config.triplet_squared = True   # squared Euclidean distances (FaceNet); False: Euclidean
config.sampler = "random"       # random (seeded shuffle) | pk (every global batch = P identities x K images; for triplet)
config.images_per_identity = 4  # K of the pk sampler (Hermans et al.: 4); batch_size x world_size must be a multiple of it
