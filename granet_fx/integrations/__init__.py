"""Adapters to other training frameworks.

Each submodule imports its framework, so import the one you use explicitly,
for example ``from granet_fx.integrations.transformers import GraNetCallback``;
``import granet_fx`` never imports them.
"""
