"""The functional core: roles, plans, units and their norm coupling, elections and scores, cloning, masking and
compact storage.

Everything here is a plain function or value of parameters, optimizer state and :class:`Roles`; nothing here
knows about a training loop or an optimizer class.
"""
