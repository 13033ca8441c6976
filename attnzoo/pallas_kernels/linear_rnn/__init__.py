"""Linear-attention and delta-rule recurrences (issue 4, in progress): the float64-checked oracle.

Every op of this family is one recurrence over a matrix state ``S [K, V]`` per head:

    S_t = exp(g_t) * diag(exp(gk_t)) @ S_{t-1}                     (decay: scalar g, per-channel gk)
    u_t = beta_t * (v_t - S_t^T k_t)  with the delta rule, else  u_t = v_t
    S_t = S_t + k_t u_t^T
    o_t = scale * S_t^T q_t

linear_attention: no decay, no delta; simple_gla (RetNet, Lightning): scalar g; gla: gk;
delta_rule: delta with no decay; gated_delta_rule: delta with scalar g; kda: delta with gk.
:mod:`reference` holds the recurrence and its one-token step; the chunked ``xla`` engine and the
Pallas kernels, which the public ops dispatch to, are still to come.
"""

from attnzoo.pallas_kernels.linear_rnn.reference import recurrence, recurrent_step

__all__ = ["recurrence", "recurrent_step"]
