"""The harness's `convert` mode: Megatron-LM's checkpoint converter (tools/checkpoint/convert.py)
on a CPU machine.

Each patch replaces one call that needs a GPU or Transformer Engine and would stop the converter
on a CPU machine, or works around an upstream bug of the converter (each says which); none
changes a computation. `install()` runs at start-up; `PATCHES` are applied by sitecustomize.py
right after their module is first imported.
"""
import importlib.metadata as _metadata
import sys

_real_version = _metadata.version


def _version(name):
    # tools/checkpoint/saver_base.py:43 asserts Transformer Engine >= 0.12 before saving, even
    # with --saver-transformer-impl local, where TE is never imported.
    if name == "transformer-engine":
        try:
            return _real_version(name)
        except _metadata.PackageNotFoundError:
            return "0.12.0"
    return _real_version(name)


def _cpu_current_device():
    # Megatron-LM places tensors on torch.cuda.current_device() where it assumes a GPU, e.g.
    # the legacy model's RotaryEmbedding (legacy/model/language_model.py:390 passes no
    # use_cpu_initialization, so rotary_pos_embedding.py:78 asks for the CUDA device).
    return "cpu"


def install():
    _metadata.version = _version
    import torch
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device

# Patches applied to a module right after it is first imported, before any importer of it
# copies a name out of it ("from megatron.training.utils import get_device_arch_version").
PATCHES = {}


def _patch_training_utils(m):
    # validate_args (megatron/training/arguments.py:928) asks the CUDA device's architecture
    # whenever TP > 1; with no GPU there is none. 0 = "older than Blackwell", the usual answer.
    m.get_device_arch_version = lambda: 0


PATCHES["megatron.training.utils"] = _patch_training_utils


# Fused kernels that need Transformer Engine or apex (absent on a CPU machine) and are on by
# default; the unfused paths compute the same thing. The converter builds its own argv, so they
# are added wherever Megatron-LM parses its arguments.
_CPU_FLAGS = ("--no-rope-fusion", "--no-gradient-accumulation-fusion")


def _patch_arguments(m):
    parse_args = m.parse_args

    def cpu_parse_args(*args, **kwargs):
        sys.argv += [f for f in _CPU_FLAGS if f not in sys.argv]
        return parse_args(*args, **kwargs)
    m.parse_args = cpu_parse_args


PATCHES["megatron.training.arguments"] = _patch_arguments


def _patch_fused_kernels(m):
    # The converter's loader calls fused_kernels.load (tools/checkpoint/loader_base.py:155), which
    # builds no kernel any more: it only runs the CUDA toolkit's nvcc for compiler flags, and
    # creates a build folder inside the (here read-only) Megatron-LM tree.
    m.load = lambda args: None


PATCHES["megatron.legacy.fused_kernels"] = _patch_fused_kernels


def _patch_loader_core(m):
    # An upstream bug, on any machine: at core_v0.16.1, tools/checkpoint/loader_core.py:62
    # stores partial(model_provider, gpt_builder) but returns the bare model_provider, which
    # loader_base.py:405 then calls without its builder ("model_provider() missing 1 required
    # positional argument: 'model_builder'"). Return the partial it built.
    cls = m.MegatronCheckpointLoaderLLM
    original = cls.import_model_provider

    def import_model_provider(self):
        original(self)
        return self.model_provider
    cls.import_model_provider = import_model_provider


PATCHES["loader_core"] = _patch_loader_core


def _patch_llama_mistral(m):
    # An upstream bug, on any machine: loader_llama_mistral.py:48 asserts "major >= 4 and
    # minor >= 31", which refuses transformers 5.0-5.30. It means version >= 4.31.
    from packaging.version import Version
    import transformers

    def verify_transformers_version():
        assert Version(transformers.__version__) >= Version("4.31"), transformers.__version__
    m.verify_transformers_version = verify_transformers_version

    # Another upstream bug of this loader: it builds Megatron-LM's legacy model, whose norms
    # read args.apply_layernorm_1p (legacy/model/utils.py:72), an argument core_v0.16.1 no
    # longer parses (it became layernorm_zero_centered_gamma).
    load_checkpoint_to_model = m.load_checkpoint_to_model

    def load_with_legacy_norm_arg(args):
        if not hasattr(args, "apply_layernorm_1p"):
            args.apply_layernorm_1p = args.layernorm_zero_centered_gamma
        return load_checkpoint_to_model(args)
    m.load_checkpoint_to_model = load_with_legacy_norm_arg


PATCHES["loader_llama_mistral"] = _patch_llama_mistral


def _one_process_world():
    """A real one-process gloo world with megatron-core's process groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _patch_converter_env(m, cls_name):
    # An upstream bug, on any machine (Megatron-LM issues #3080 and #3132): the converter fakes
    # only the TP and EP groups, but GPTModel at core_v0.16.1 asks parallel_state for every group
    # (language_module.py:49 -> ProcessGroupCollection.use_mpu_process_groups) and fails with
    # "data parallel group with context parallel combined is not initialized"; and with no
    # torch.distributed world, megatron/core/utils.py:527 reads every group's size as 1, so the
    # fake TP group is ignored and TP>1 shards fail to load. Give each converter process a real
    # one-process world with megatron-core's groups; the converter then sets its TP/PP sizes,
    # ranks and fake TP group over it, as it does today.
    cls = getattr(m, cls_name)
    original = cls.initialize_megatron_env

    def initialize_megatron_env(self):
        _one_process_world()
        original(self)
    cls.initialize_megatron_env = initialize_megatron_env


def _patch_checkpointing(m):
    # With a torch.distributed world, read_metadata (checkpointing.py:315) all-reduces the
    # tracker's iteration in a CUDA tensor; over a world of one that maximum is the value read.
    import torch.distributed as dist
    read_metadata = m.read_metadata

    def cpu_read_metadata(tracker_filename):
        if dist.is_initialized() and dist.get_world_size() == 1:
            is_initialized, dist.is_initialized = dist.is_initialized, lambda: False
            try:
                return read_metadata(tracker_filename)
            finally:
                dist.is_initialized = is_initialized
        return read_metadata(tracker_filename)
    m.read_metadata = cpu_read_metadata


    # save_checkpoint collects the RNG states even when they are not saved (--no-save-rng, as the
    # converter runs): checkpointing.py:343 asks for the CUDA generator's state. With no GPU
    # there is none; an empty state stands for it.
    import torch
    if not torch.cuda.is_available():
        torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)


PATCHES["megatron.training.checkpointing"] = _patch_checkpointing
def _patch_language_module(m):
    # With tied embeddings, building a model in a torch.distributed world all-reduces the shared
    # weight over the embedding group after moving it to CUDA (language_module.py:244). Over a
    # world of one process (the converter's) that all-reduce is the identity: skip it there.
    import torch.distributed as dist
    cls = m.LanguageModule
    in_group = cls._is_in_embd_group

    def _is_in_embd_group(self):
        if dist.is_initialized() and dist.get_world_size() == 1:
            return False
        return in_group(self)
    cls._is_in_embd_group = _is_in_embd_group


PATCHES["megatron.core.models.common.language_module.language_module"] = _patch_language_module
PATCHES["loader_base"] = lambda m: _patch_converter_env(m, "MegatronCheckpointLoaderBase")
PATCHES["saver_base"] = lambda m: _patch_converter_env(m, "MegatronCheckpointSaverBase")
