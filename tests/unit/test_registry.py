import pytest

from rl.registry import Registry


def _make():
    reg = Registry("widget", capabilities={"needs_ref_logprobs": False, "needs_step_ids": False})

    @reg.register("alpha")
    def alpha(x):
        return x + 1

    @reg.register("beta", needs_step_ids=True)
    def beta(x):
        return x * 2

    return reg


def test_register_get_names_capabilities():
    reg = _make()
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("alpha")(1) == 2
    assert reg.get("beta")(3) == 6
    assert reg.capabilities("alpha") == {"needs_ref_logprobs": False, "needs_step_ids": False}
    assert reg.capabilities("beta") == {"needs_ref_logprobs": False, "needs_step_ids": True}
    assert "alpha" in reg and "gamma" not in reg and len(reg) == 2
    assert list(reg) == ["alpha", "beta"]


def test_decorator_returns_function_unchanged():
    reg = Registry("widget")

    def f():
        return 7

    assert reg.register("f")(f) is f


def test_unknown_name_lists_valid_and_suggests_nearest():
    reg = _make()
    with pytest.raises(ValueError, match=r"unknown widget 'alpah'.*Did you mean 'alpha'\?.*alpha, beta"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="Valid names: alpha, beta"):
        reg.capabilities("zzz")


def test_duplicate_and_unknown_capability_rejected():
    reg = _make()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(lambda x: x)
    with pytest.raises(ValueError, match="unknown capabilities"):
        reg.register("gamma", needs_ref_logprob=True)


def test_capabilities_is_a_copy():
    reg = _make()
    reg.capabilities("alpha")["needs_step_ids"] = True
    assert reg.capabilities("alpha")["needs_step_ids"] is False
