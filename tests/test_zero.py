"""ift/training/zero.py: DeepSpeed configs that would train differently from the recipe are refused at setup."""

from __future__ import annotations

import pytest

from ift.errors import IftError
from ift.training.zero import deepspeed_updates


def test_max_grad_norm_is_written_where_deepspeed_clips():
    assert deepspeed_updates({"gradient_clipping": "auto"}, 2, 0.5) == {"gradient_clipping": 0.5}
    assert deepspeed_updates({}, 2, 0.0) == {"gradient_clipping": 0.0}  # 0: no clipping, in both
    assert deepspeed_updates({"gradient_clipping": 0.5}, 2, 0.5) == {"gradient_clipping": 0.5}


def test_a_different_clipping_in_the_config_is_refused_naming_both():
    with pytest.raises(IftError, match="clips gradients at 1.0 but training.max_grad_norm is 0.3") as err:
        deepspeed_updates({"gradient_clipping": 1.0}, 2, 0.3)
    assert "gradient_clipping" in err.value.where and "auto" in err.value.fix


@pytest.mark.parametrize("steps", [2, 8])
def test_the_engine_may_not_accumulate_on_top_of_ift(steps):
    with pytest.raises(IftError, match=f"gradient_accumulation_steps: {steps}") as err:
        deepspeed_updates({"gradient_accumulation_steps": steps}, 2, 1.0)
    assert "divide the loss a second time" in err.value.fix
    assert deepspeed_updates({"gradient_accumulation_steps": 1}, 2, 1.0)
    assert deepspeed_updates({"gradient_accumulation_steps": "auto"}, 2, 1.0)


def test_zero3_without_gathered_weights_is_refused_before_training():
    with pytest.raises(IftError, match="cannot write final/") as err:
        deepspeed_updates({"zero_optimization": {"stage": 3}}, 3, 1.0)
    assert "stage3_gather_16bit_weights_on_model_save" in err.value.where
    ok = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    assert deepspeed_updates(ok, 3, 1.0) == {"gradient_clipping": 1.0}
    assert deepspeed_updates({"zero_optimization": {"stage": 2}}, 2, 1.0)  # ZeRO-2 saves whole weights anyway
