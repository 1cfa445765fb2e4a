"""Contexts: new single/multi schema, old user schema, invalid forms, fully-qualified key, secure mode hash."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from relayd.launchdarkly.contexts import Context, ContextError, parse_context, secure_mode_hash


def test_single_user_context():
    c = parse_context({"kind": "user", "key": "abc", "name": "Ann", "anonymous": True, "email": "a@b",
                       "nested": {"x": 1}, "gone": None, "_meta": {"privateAttributes": ["/email"]}})
    assert c.kind == "user" and c.key == "abc" and c.name == "Ann" and c.anonymous is True
    assert not c.multiple and c.kinds == ("user",)
    assert c.get("user") is c and c.get(None) is c and c.get("org") is None
    assert c.get_value("email") == "a@b" and c.get_value("nested") == {"x": 1}
    assert c.get_value("gone") is None  # null attribute = undefined
    assert c.get_value("key") == "abc" and c.get_value("kind") == "user" and c.get_value("name") == "Ann"
    assert c.private_attributes == ("/email",)
    assert c.fully_qualified_key == "abc"
    assert c.secondary is None and not c.old_user


def test_anonymous_defaults_false_and_is_addressable():
    c = parse_context({"kind": "user", "key": "k"})
    assert c.get_value("anonymous") is False
    assert c.get_value("name") is None


def test_non_user_single_kind_fqk_escapes():
    c = parse_context({"kind": "org", "key": "a:b%c"})
    assert c.fully_qualified_key == "org:a%3Ab%25c"


def test_multi_context_sorted_and_fqk():
    c = parse_context({"kind": "multi", "user": {"key": "u:1"}, "org": {"key": "o1", "name": "Org"}})
    assert c.multiple and c.kind == "multi"
    assert c.kinds == ("org", "user")
    assert c.get("org").name == "Org" and c.get("user").key == "u:1" and c.get("device") is None
    assert c.fully_qualified_key == "org:o1:user:u%3A1"
    assert c.get_value("kind") == "multi"


def test_multi_with_one_kind_is_that_single_context():
    c = parse_context({"kind": "multi", "org": {"key": "o1"}})
    assert not c.multiple and c.kind == "org" and c.key == "o1"


def test_old_user_format():
    c = parse_context({"key": "abc", "secondary": "sec", "ip": "1.2.3.4", "country": "NZ", "email": "e",
                       "firstName": "F", "lastName": "L", "avatar": "av", "name": "N", "anonymous": False,
                       "custom": {"plan": "gold", "email": "ignored", "n": 3, "nul": None},
                       "privateAttributeNames": ["email", "/slashy"]})
    assert c.kind == "user" and c.key == "abc" and c.old_user
    assert c.secondary == "sec"
    assert c.name == "N"
    assert c.get_value("plan") == "gold" and c.get_value("n") == 3
    assert c.get_value("email") == "e"  # built-in wins over custom of the same name
    assert c.get_value("ip") == "1.2.3.4" and c.get_value("country") == "NZ"
    assert c.get_value("nul") is None
    assert c.get_value("secondary") is None  # secondary is not an addressable attribute
    assert c.private_attributes == ("email", "/~1slashy")
    assert c.fully_qualified_key == "abc"


@pytest.mark.parametrize("obj", [
    {"kind": "user", "key": ""},
    {"kind": "user"},
    {"key": ""},
    {"name": "no key"},
])
def test_empty_or_missing_key_message(obj):
    with pytest.raises(ContextError) as e:
        parse_context(obj)
    assert str(e.value) == "User must have a 'key' attribute"


@pytest.mark.parametrize("obj", [
    None, [], "user", 3,
    {"kind": "user", "key": None},
    {"kind": "user", "key": 5},
    {"key": None},
    {"key": 5},
    {"kind": "", "key": "a"},
    {"kind": "kind", "key": "a"},
    {"kind": "us er", "key": "a"},
    {"kind": "ü", "key": "a"},
    {"kind": 3, "key": "a"},
    {"kind": None, "key": "a"},
    {"kind": "user", "key": "a", "name": 3},
    {"kind": "user", "key": "a", "anonymous": "yes"},
    {"kind": "user", "key": "a", "_meta": []},
    {"kind": "user", "key": "a", "_meta": {"privateAttributes": [1]}},
    {"kind": "multi"},
    {"kind": "multi", "user": "abc"},
    {"kind": "multi", "user": {"key": ""}},
    {"kind": "multi", "multi": {"key": "a"}},
    {"kind": "multi", "bad kind": {"key": "a"}},
    {"kind": "multi", "user": {"key": "a"}, "org": {}},
    {"key": "a", "custom": []},
    {"key": "a", "email": 3},
    {"key": "a", "secondary": 1},
    {"key": "a", "anonymous": 1},
    {"key": "a", "privateAttributeNames": "email"},
])
def test_invalid_contexts(obj):
    with pytest.raises(ContextError):
        parse_context(obj)


def test_context_error_is_value_error():
    assert issubclass(ContextError, ValueError)


def test_multi_builder_rejects_duplicates_and_nesting():
    a = parse_context({"kind": "org", "key": "1"})
    b = parse_context({"kind": "org", "key": "2"})
    with pytest.raises(ContextError):
        Context.multi([a, b])
    m = Context.multi([a, parse_context({"kind": "user", "key": "u"})])
    with pytest.raises(ContextError):
        Context.multi([m, parse_context({"kind": "device", "key": "d"})])
    with pytest.raises(ContextError):
        Context.multi([])


def test_to_dict_round_trip():
    obj = {"kind": "multi", "org": {"key": "o", "name": "O", "tier": 2},
           "user": {"key": "u", "anonymous": True, "_meta": {"privateAttributes": ["x"]}}}
    c = parse_context(obj)
    assert c.to_dict() == obj
    assert parse_context(c.to_dict()) == c


def test_secure_mode_hash_uses_fully_qualified_key():
    user = parse_context({"key": "user-key"})
    expected = hmac.new(b"sdk-secret", b"user-key", hashlib.sha256).hexdigest()
    assert secure_mode_hash("sdk-secret", user) == expected
    org = parse_context({"kind": "multi", "user": {"key": "u"}, "org": {"key": "o:1"}})
    expected = hmac.new(b"sdk-secret", b"org:o%3A1:user:u", hashlib.sha256).hexdigest()
    assert secure_mode_hash("sdk-secret", org) == expected
    assert secure_mode_hash("sdk-secret", org) == secure_mode_hash("sdk-secret", org).lower()
