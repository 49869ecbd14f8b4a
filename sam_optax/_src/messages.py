"""Every message template of sam_optax's checks.

Each message says the call, what is wrong, why, and the exact fix; the checks
(:mod:`sam_optax._src.checks`) and the diagnostics format them. The tests
assert them.
"""

MISSING_LOSS_FN = (
    "`{name}.update` needs the keyword argument `loss_fn` (received none). "
    "A sharpness-aware step re-evaluates the loss at the perturbed params, so "
    "call `tx.update(grads, state, params, loss_fn=loss_fn)` where "
    "`loss_fn(params)` returns the scalar loss of the current batch{aux_hint}."
)


MISSING_PARAMS = (
    "`{name}.update` needs `params` (received None): the perturbation is "
    "applied to the current params. Call `tx.update(grads, state, params, "
    "loss_fn=loss_fn)`."
)
TREE_MISMATCH = (
    "`{name}.update`: `updates` and `params` have different tree structures "
    "(updates: {updates}; params: {params}). Pass the gradient of `loss_fn` "
    "with respect to exactly the params given to `update`."
)
NON_FLOAT_PARAMS = (
    "`{name}`: params leaf {path} has dtype {dtype}; params must be floating "
    "point: the perturbed pass differentiates `loss_fn` with respect to every "
    "params leaf (as `jax.grad` does, which rejects integer inputs), so "
    "neither `mask=` nor `optax.masked` can exclude an integer leaf. Keep "
    "integer state (counters, indices) out of the params tree: pass it to "
    "`loss_fn` by closure or with the batch."
)
LOSS_RETURNED_TUPLE = (
    "`{name}`: `loss_fn` returned a {kind} of length {n}, but `has_aux=False`. "
    "If it returns `(loss, aux)`, create the transform with `has_aux=True`; "
    "otherwise make `loss_fn` return the scalar loss."
)
LOSS_NOT_AUX_PAIR = (
    "`{name}(..., has_aux=True)`: `loss_fn` must return a pair `(loss, aux)`, "
    "but it returned {got}. Return `(loss, aux)`, or drop `has_aux=True` if "
    "the loss has no auxiliary output."
)
LOSS_NOT_SCALAR = (
    "`{name}`: `loss_fn` must return a scalar loss, but it returned an array "
    "of shape {shape}. Reduce it (for example `jnp.mean(per_example_loss)`)."
)
BAD_VALUE = (
    "`{name}.update(..., value=...)`: value is the unperturbed loss L(w), a "
    "scalar; got a non-scalar {got}. With `has_aux=True`, `jax.value_and_grad` returns "
    "`((loss, aux), grads)`: pass `value=loss`, not the pair."
)
LOSS_NOT_FLOAT = "`{name}`: `loss_fn` must return a floating-point loss, but it returned dtype {dtype}."
BAD_RHO = (
    "`{name}(rho={rho!r})`: ρ must be a finite number ≥ 0 (or an optax "
    "schedule). Use `rho=0.05` for plain SAM; `rho=0` gives the base optimizer."
)
RHO_NOT_A_NUMBER = (
    "`{name}(rho={rho!r})`: ρ must be a float (or a scalar array, or an optax "
    "schedule `count -> ρ`), got {kind}. A value read from a config file "
    "arrives as a string: convert it, `rho=float(value)`."
)
KNOB_NOT_A_NUMBER = (
    "`{name}({arg}={value!r})`: {arg} must be a number, got {kind}. A value "
    "read from a config file arrives as a string: convert it, "
    "`{arg}=float(value)`."
)
BAD_P = (
    "`{name}(p={p!r})`: the perturbation norm p must be > 1 (for example "
    "`p=2`, the default, or `p=float('inf')`); p = 1 has no well-defined "
    "steepest-ascent direction."
)
UNNORMALIZED_P = (
    "`{name}(normalize=False, p={p!r})`: the unnormalized step (USAM) is "
    "`ε = ρ g` and has no norm; drop `p` or use `normalize=True`."
)
AXIS_NOT_BOUND = (
    "`{name}(..., axis_name={axis!r})`: no axis named {axis!r} is bound here. "
    "Call `update` inside `jax.shard_map` or `jax.pmap` over that axis, or "
    "pass `axis_name=None` for single-device (or plain `jit`) training."
)
STATIC_ARG = (
    "`{name}`: `{arg}` is structural (it selects the computation) and cannot "
    "be a traced or injected array. With `optax.inject_hyperparams`, list it "
    "in `static_args`: `optax.inject_hyperparams({name}, "
    "static_args=('{arg}',))(...)`."
)
INSIDE_OPTAX_MASKED = (
    "`{name}` inside `optax.masked`: the masked wrapper hands the transform "
    "only part of the params, but `loss_fn` needs all of them. To perturb "
    "only some leaves, use the transform's own option instead: "
    "`{name}(..., mask=mask)`. (Integer leaves cannot be masked out either "
    "way: keep them out of the params tree.)"
)

GRADS_NOT_PER_DEVICE = (
    "`{name}(..., axis_name={axis!r})`: the gradients passed to `update` are "
    "identical on every device (not varying over {axis!r}). Under "
    "`jax.shard_map`, `jax.grad` with respect to replicated params returns the "
    "SUM of all devices' gradients, so each device would perturb with the "
    "global gradient and m-sharpness is lost. Differentiate with respect to "
    "`sam_optax.per_device(params, {axis!r})` (that is, "
    "`jax.lax.pcast(params, {axis!r}, to='varying')`) so that each device gets "
    "its own gradient."
)

PER_DEVICE_NOT_BOUND = (
    "`sam_optax.per_device(params, {axis!r})`: no axis named {axis!r} is bound "
    "here. Call it inside the `jax.shard_map` (or `jax.pmap`) function that "
    "maps over {axis!r}; under plain `jax.jit` there is nothing to do, so drop "
    "the call."
)

MISSING_BATCH = (
    "`{name}(m={m})`: `update` needs `batch=`, a pytree whose leaves have a "
    "leading batch axis, to give each group of m examples its own "
    "perturbation (received none). Call `tx.update(grads, state, params, "
    "loss_fn=loss_fn, batch=batch)` with `loss_fn(params, chunk)`."
)

BAD_BATCH_SIZE = (
    "`{name}(m={m})`: m (examples per perturbation) must divide the "
    "(per-device) batch size, but the batch has {b} examples. Pick m among "
    "the divisors of {b} ({divisors}), or change the batch size."
)

LOSS_FN_ARITY_M = (
    "`{name}(m={m})`: with `m`, `loss_fn` is called as `loss_fn(params, "
    "chunk)` on each group of m examples, but the given `loss_fn` cannot take "
    "two positional arguments (signature {sig}). Write it as "
    "`loss_fn(params, batch)` and pass the batch as `batch=`, or drop `m` and "
    "use a `loss_fn(params)` that closes over the batch."
)

LOSS_FN_ARITY_NO_M = (
    "`{name}`: `loss_fn` is called as `loss_fn(params)`, but the given "
    "`loss_fn` needs more positional arguments (signature {sig}). Close over "
    "the batch (`loss_fn=lambda p: loss(p, batch)`), or, for m-sharpness "
    "inside a device, create the transform with `m=` and pass `batch=`."
)

GROUP_GRADS_WITHOUT_M = (
    "`{name}.update(..., group_grads=...)`: per-group gradients are only used "
    "with in-device m-sharpness, but the transform was created without `m`. "
    "Create it with `{name}(..., m=m)` (the same m as in "
    "`sam_optax.group_value_and_grad(loss_fn, m)`), or drop `group_grads`."
)

BAD_GROUP_GRADS = (
    "`{name}.update(..., group_grads=...)`: expected a pytree like params with "
    "a leading axis of {groups} groups (batch of {b} examples / m={m}), as "
    "returned by `sam_optax.group_value_and_grad(loss_fn, {m})(params, "
    "batch)`; {got}."
)

BAD_GROUP_LOOP = (
    "`{name}(group_loop={loop!r})`: unknown way to run over the groups of m "
    "examples. Use 'vmap' (all groups in one vectorized pass; the default), "
    "'scan' (one group at a time in a loop: memory of one perturbed copy of "
    "the params) or 'unroll' (one group at a time, unrolled into the "
    "compiled program)."
)
BAD_M = (
    "`{name}(m={m!r})`: m is the number of examples per perturbation and must "
    "be a positive integer{alt}."
)
M_WITH_STATEFUL_RULE = (
    "`{name}(m={m})`: this method keeps state across steps and cannot give "
    "each group of examples its own perturbation. Drop `m`, or use "
    "`axis_name` for one perturbation per device."
)
GROUP_LOOP_WITHOUT_M = (
    "`{name}(group_loop={loop!r})`: group_loop says how the groups of m "
    "examples run (in-device m-sharpness), but `m` is not set, so there are no "
    "groups. Set `m=` (and pass `batch=` to `update`), or drop `group_loop`."
)
BAD_AXIS_NAME = (
    "`{name}(axis_name={axis!r})`: expected a mapped axis name (a str, or a "
    "tuple of str), as given to `jax.pmap` or `jax.shard_map`."
)
LEAFWISE_MISMATCH = (
    "`{name}(...)`, argument `{arg}`: the {arg} tree does not match the params "
    "tree (params: {params}; {arg}: {tree}). Give {what} per params leaf, or a "
    "callable `params -> {arg}`."
)
MASK_SELECTS_NOTHING = (
    "`{name}(..., mask=...)`: the mask selects no params leaf (every leaf is "
    "False), so ε would be 0 and every step would be the base optimizer's "
    "at twice the cost. Select at least one leaf{hint}."
)
NORMALIZATION_MASK_HINT = (
    ": `sam_optax.normalization_params_mask` marks a leaf when a module name "
    "in its path (dict keys, attribute names, and the parts of a flat key "
    "such as 'h.0.ln_1.weight', split at '.' and '/') contains 'norm' or is "
    "bn/ln/gn with an optional index or suffix. Name your normalization "
    "layers so, or build the mask with `sam_optax.path_mask(lambda path, "
    "leaf: ...)`"
)
MASK_LEAF_NOT_BOOL = (
    "`{name}(..., mask=...)`: mask leaf {path} is {got}; `mask` takes one "
    "bool per params leaf (True: perturb that leaf, False: leave it "
    "unperturbed). {fix}"
)
MASK_LEAF_ARRAY_FIX = (
    "A mask selects whole leaves: to perturb part of a leaf, split that "
    "leaf into two params leaves."
)
MASK_LEAF_TRACED_FIX = (
    "The mask must be known when the step is traced (it selects the "
    "computation): decide it from the params' paths, shapes and dtypes, not "
    "from their values."
)
MASK_CALLABLE_FAILED = (
    "`{name}(..., mask=<callable>)`: the mask callable raised {error} when "
    "called on the params' shapes and dtypes. A mask callable receives the "
    "params tree with `jax.ShapeDtypeStruct` leaves (`.shape`, `.ndim`, "
    "`.dtype`; paths via `sam_optax.path_mask`), not their values, so that "
    "the same leaves are perturbed at every step, eagerly and under `jit`. "
    "Decide from paths, shapes and dtypes (the original error is chained "
    "below)."
)
STATE_MISMATCH = (
    "`{name}.update`: the optimizer state does not match `params` "
    "({detail}). The state was built by `tx.init` for other params; build "
    "it for the params you pass to `update`: `state = tx.init(params)`."
)
REMOVE_PERTURBATION_MISMATCH = (
    "`sam_optax.remove_perturbation`: `params` do not match the `msam` state "
    "in `opt_state` ({detail}). Pass the params of the training loop that "
    "made `opt_state` (the tree given to `tx.init`, as returned by "
    "`optax.apply_updates`)."
)
BAD_RHO_SCALE = (
    "`{name}(..., rho_scale=...)`: leaf {path} is {leaf!r}; per-leaf ρ "
    "multipliers must be finite numbers ≥ 0 (0 leaves that leaf unperturbed, 1 "
    "keeps ρ)."
)
KNOB_IS_CALLABLE = (
    "`{name}({arg}=<callable>)`: {arg} must be a number (or a scalar array), "
    "not a schedule. To change it during training, build the optimizer with "
    "`optax.inject_hyperparams({name})(...)` and set "
    "`state.hyperparams['{arg}']`."
)
KNOB_IS_BOOL = "`{name}({arg}={value!r})`: expected a number, got a bool."
KNOB_NOT_SCALAR = "`{name}({arg}=...)`: {arg} must be a scalar, got shape {shape}."
KNOB_OUT_OF_RANGE = "`{name}({arg}={value!r})`: {arg} must be a finite number {interval}.{hint}"
BAD_K = (
    "`{name}(k={k!r})`: k is the number of steps from one SAM step to the next "
    "and must be an integer ≥ 1 (k=1 runs SAM on every step). The papers use "
    "k=5."
)
BAD_ASAM_OPERATOR = (
    "`{name}(operator={operator!r})`: unknown normalization operator. Use "
    "'official' (T_w = |w| + η on weight matrices, 1 on biases; the default), "
    "'all' (|w| + η on every leaf) or 'abs' (|w| on every leaf, no η)."
)
EMPTY_BATCH = "`{name}(m={m})`: `batch` has no arrays."
RAGGED_BATCH = (
    "`{name}(m={m})`: every leaf of `batch` needs the same leading batch axis; "
    "got leading sizes {sizes}."
)
RULE_STATE_STRUCTURE = (
    "A perturbation rule's `ascent` must return a rule state with the same "
    "tree structure as the one it received."
)
LR_MAX_NEEDED = (
    "`{name}(..., lr_max=None)`: with a learning-rate schedule, pass its peak "
    "value `lr_max=` (and its final value `lr_min=`), so that ρ goes from "
    "rho_max at the peak to rho_min at the end."
)
LR_MAX_BELOW_MIN = (
    "`{name}(lr_max={lr_max!r}, lr_min={lr_min!r})`: lr_max must be ≥ lr_min "
    "(the peak and the final learning rate)."
)
GET_INFO_NOT_ONE = (
    "`sam_optax.get_info`: expected exactly one sharpness-aware block in the "
    "optimizer state, found {found}. Pass the state returned by a `sam_optax` "
    "transform (or the part of it that belongs to one)."
)
REMOVE_PERTURBATION_NOT_ONE = (
    "`sam_optax.remove_perturbation`: expected the state of exactly one "
    "`sam_optax.msam` in `opt_state`, found {found}. Only MSAM hands back "
    "perturbed params (every other sam_optax transform returns unperturbed "
    "ones, so there is nothing to remove); pass the state returned by "
    "`tx.update` of an `msam` optimizer."
)
