"""``KaSADPOTrainer``: TRL's ``DPOTrainer`` plus KaSA, with the step-0 policy as reference.

The reference is the policy itself with its KaSA adapters disabled (the truncated base, dW off): no second
model in memory and no second decomposition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import trl
from datasets import Dataset, IterableDataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    AutoProcessor,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_utils import EvalPrediction
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as _trl_dpo
from trl.trainer.utils import get_config_model_id

from .config import KaSAConfig
from .layer import KaSALinear
from .model import kasa_adapters_disabled, kasa_layers
from .quantized_training import check_quantized_training, trainer_construction
from .trainer import KaSATrainerMixin
from .unloading import unload

_PREFERENCE_COLUMNS = ("chosen", "rejected")


class _AdaptersOffPolicy:
    """DPO's reference model for KaSA: the trainer's own policy with every KaSA adapter disabled, i.e. the
    truncated base with dW off, which is exactly the policy at step 0 (B = 0 there).

    TRL calls it like a model (``ref_model(**inputs, labels=..., fused_lm_head=True)``). Not an ``nn.Module`` on
    purpose: the trainer must not prepare, wrap, hash or copy it; it owns no weights.
    """

    def __init__(self, trainer: KaSADPOTrainer) -> None:
        self._trainer = trainer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # ``trainer.model`` read at call time, as TRL's own PEFT reference path does: it may be re-wrapped later.
        model = self._trainer.model
        with torch.no_grad(), kasa_adapters_disabled(model):
            return model(*args, **kwargs)

    def __repr__(self) -> str:
        return "KaSA reference: the policy with its KaSA adapters disabled (truncated base, dW off)"


@contextlib.contextmanager
def _no_reference_model_loading() -> Iterator[None]:
    """Within the block, TRL's ``DPOTrainer.__init__`` builds no reference model.

    TRL 1.16 reloads the policy's checkpoint (``create_model_from_path(config._name_or_path)``) as the reference
    unless the policy is a ``PeftModel``. KaSA's reference is the policy itself with its adapters off, so that
    reload would cost a second copy of the model (and a second decomposition, were KaSA applied to it). The
    policy is always an instance when this runs, so the reference is the only model TRL would load here.
    """
    if not hasattr(_trl_dpo, "create_model_from_path"):
        raise RuntimeError(
            f"this trl ({trl.__version__}) no longer loads DPO's reference model through "
            "trl.trainer.dpo_trainer.create_model_from_path; KaSADPOTrainer supports trl 1.16"
        )
    original = _trl_dpo.create_model_from_path
    _trl_dpo.create_model_from_path = _load_no_model
    try:
        yield
    finally:
        _trl_dpo.create_model_from_path = original


def _load_no_model(*args: Any, **kwargs: Any) -> Any:
    """Stands in for TRL's ``create_model_from_path`` in ``_no_reference_model_loading``: no reference model."""
    return None


def _check_preference_columns(dataset: Any, name: str) -> None:
    """Fail early, naming what is missing, when a DPO dataset lacks the ``chosen``/``rejected`` columns (TRL
    itself would stop on a bare ``KeyError`` in the middle of its preprocessing)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # DatasetDict or a dict of named eval sets
        for key, split in dataset.items():
            _check_preference_columns(split, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset whose features are unknown until read
        columns = list(next(iter(dataset)).keys())
    missing = [c for c in _PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{name} is missing the column(s) {missing} (it has {sorted(columns)}). KaSADPOTrainer expects TRL's "
            "preference format: 'prompt', 'chosen', 'rejected' as strings, e.g. {'prompt': 'What is 2 + 2?', "
            "'chosen': '4.', 'rejected': '5.'}, or as conversations (lists of {'role', 'content'} messages); "
            "'prompt' may be left out when chosen and rejected are conversations that share their first messages"
        )


class KaSADPOTrainer(KaSATrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` training a KaSA adapter with the KaSA regularizers.

    Same arguments as ``DPOTrainer`` plus ``kasa_config`` (default ``KaSAConfig()``); ``peft_config`` may be a
    ``KaSAConfig`` or a ``peft.LoraConfig(kasa_config=...)``, nothing else.

    The reference policy is the policy at step 0: the truncated base with the adapter off. It is computed by
    the trained model itself with its adapters disabled, so there is no second model in memory and no second
    decomposition (also for ``precompute_ref_log_probs=True``). KaSA is applied before TRL's constructor runs,
    so that everything TRL does with the policy there (precomputing reference log-probs, hashing it, patching
    its LM head) sees the truncated model. An explicit ``ref_model`` is used as given. ``sync_ref_model=True``
    is rejected: the reference is fixed by construction.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, Any]] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        kasa_config: KaSAConfig | None = None,
    ) -> None:
        config = self._kasa_resolve_config(kasa_config, peft_config)
        if args is None:  # as DPOTrainer names it
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True is not supported by KaSADPOTrainer: the reference is the policy with its KaSA "
                "adapters disabled (the truncated base, the policy at step 0), fixed by construction; set "
                "sync_ref_model=False"
            )
        if ref_model is not None and ref_model is model and not isinstance(model, str):
            raise ValueError(
                "model and ref_model are the same object; omit ref_model: KaSADPOTrainer's reference is the policy "
                "with its KaSA adapters disabled (the policy at step 0)"
            )
        _check_preference_columns(train_dataset, "train_dataset")
        _check_preference_columns(eval_dataset, "eval_dataset")

        # KaSA goes on before TRL's constructor (see the class docstring), so a model given by name is loaded here,
        # as DPOTrainer would load it.
        model_init_kwargs = args.model_init_kwargs
        if isinstance(model, str):
            model_id = model
            model, revision = _load_policy(model_id, args, quantization_config)
            quantization_config = None
            if processing_class is None:
                processing_class = AutoProcessor.from_pretrained(
                    model_id, revision=revision, trust_remote_code=args.trust_remote_code
                )
            args.model_init_kwargs = None  # consumed above; TRL would warn that they are ignored
        check_quantized_training(model, args)
        # Seeds the adapter's random init (A, sigma), as TRL seeds before creating PEFT adapters.
        set_seed(args.seed)
        adapted_here = not kasa_layers(model)
        requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        config = self._kasa_adapt(model, config)
        self._kasa_reference_is_policy = ref_model is None
        reference_loading = _no_reference_model_loading() if ref_model is None else contextlib.nullcontext()
        try:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if isinstance(head, KaSALinear):
                raise ValueError(
                    "a KaSA adapter on the LM head is not supported by DPO: TRL computes the log-probabilities from "
                    "lm_head.weight directly, so the adapter would be bypassed. Remove the head from target_modules"
                )
            with reference_loading, trainer_construction(model):
                super().__init__(
                    model=model,
                    ref_model=ref_model,
                    args=args,
                    data_collator=data_collator,
                    train_dataset=train_dataset,
                    eval_dataset=eval_dataset,
                    processing_class=processing_class,
                    compute_metrics=compute_metrics,
                    callbacks=callbacks,
                    optimizers=optimizers,
                    quantization_config=quantization_config,
                )
        except BaseException:
            if adapted_here:  # the caller's model as it was (unload: see its docstring for in-place rounding)
                unload(model)
                for param, flag in requires_grad:
                    param.requires_grad_(flag)
            raise
        finally:
            args.model_init_kwargs = model_init_kwargs
        self._kasa_setup(config)
        if self._kasa_reference_is_policy:
            self.ref_model = _AdaptersOffPolicy(self)  # type: ignore[assignment]  # TRL only calls it (see the class)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``DPOTrainer``'s (used to precompute reference log-probs), with the KaSA adapters off when the
        reference is the policy."""
        if not self._kasa_reference_is_policy:
            return super().compute_ref_log_probs(model, inputs)
        with kasa_adapters_disabled(self.model):
            return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        # Without a reference model TRL runs the policy itself here, wrapped in a DeepSpeed inference engine under
        # DeepSpeed (before train() its parameters are neither placed nor gathered), and compute_ref_log_probs
        # turns the adapters off. Hide our reference object so TRL takes that path also after __init__
        # (evaluate() precomputes for a new eval set).
        reference = self.ref_model
        if isinstance(reference, _AdaptersOffPolicy):
            self.ref_model = None
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self.ref_model = reference


def _load_policy(
    model_id: str, args: DPOConfig, quantization_config: Any
) -> tuple[PreTrainedModel, str | None]:
    """Load ``model_id`` as ``DPOTrainer.__init__`` (TRL 1.16) does; also return the revision it was loaded at."""
    # Typed "| str": TrainingArguments.__post_init__ parses a JSON object string into a dict (TRL's loading, too,
    # takes dict() of it).
    kwargs = dict(cast("dict[str, Any] | None", args.model_init_kwargs) or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "quantization_config is set both as a trainer argument and in args.model_init_kwargs; set it once"
            )
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # distributed training needs device_map=None ("auto" fails)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return _trl_dpo.create_model_from_path(model_id, **kwargs), kwargs.get("revision")
