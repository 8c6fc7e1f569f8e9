"""Vertical federated training: the parties hold different feature blocks of the same
entities, one of them (the label party) the labels.

Private set intersection: :mod:`~tasks.vertical.psi_curve` (keys onto the curve, blinding),
:mod:`~tasks.vertical.psi_protocol` (secrets, messages, steps), :mod:`~tasks.vertical.psi_memory`
(the whole star in one process). Pure training core: :mod:`~tasks.vertical.data` (labels and
blocks), :mod:`~tasks.vertical.rounds` (the label party's side of gradient rounds),
:mod:`~tasks.vertical.party_model` (a party's side), :mod:`~tasks.vertical.fusion` (score-level
fusion), :mod:`~tasks.vertical.one_shot`, :mod:`~tasks.vertical.loop` (in-memory loop). Steps
on stores: :mod:`~tasks.vertical.steps_label` and :mod:`~tasks.vertical.steps_party` (one
module per role) over :mod:`~tasks.vertical.inputs`, :mod:`~tasks.vertical.arrays` and
:mod:`~tasks.vertical.refs`; :mod:`~tasks.vertical.steps` wraps them as typed Prefect tasks.
"""
