"""A radix tree over token ids: which stored prompts are prefixes of a new request.

Edge labels are ``array('i')`` (4 bytes per token) and shared prefixes are stored once, so a
conversation's token ids live *in the tree*: a conversation keeps only its node and the tokens
after it (:meth:`Node.tokens` rebuilds the full sequence). Nodes are never replaced when the
tree is split or merged, so a node handed out by :meth:`RadixTree.insert` stays valid until
every key ending there is removed.
"""

from __future__ import annotations

from array import array
from typing import Iterator, Sequence


def as_ids(tokens: Sequence[int]) -> array:
    """Token ids as a compact ``array('i')`` (int32, 4 bytes each)."""
    return tokens if isinstance(tokens, array) and tokens.typecode == "i" else array("i", tokens)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on slice equality: C-speed compares, O(n log n) worst case
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Node:
    """One node: the edge label from its parent, its children by first token, the keys ending here."""

    __slots__ = ("label", "parent", "children", "keys")

    def __init__(self, label: array, parent: "Node | None") -> None:
        self.label = label
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.keys: set = set()

    def depth(self) -> int:
        """Tokens from the root to the end of this node."""
        n, node = 0, self
        while node is not None:
            n, node = n + len(node.label), node.parent
        return n

    def tokens(self) -> array:
        """The token ids from the root to this node."""
        parts, node = [], self
        while node is not None:
            parts.append(node.label)
            node = node.parent
        out = array("i")
        for part in reversed(parts):
            out.extend(part)
        return out


class RadixTree:
    """Keys are token sequences; each key ends at a node that holds a set of values (conversation ids)."""

    def __init__(self) -> None:
        self.root = Node(array("i"), None)

    def insert(self, tokens: Sequence[int], value) -> Node:
        """Store ``value`` under ``tokens``; returns the node where the key ends."""
        tokens = as_ids(tokens)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = Node(tokens[pos:], node)
                node.children[tokens[pos]] = leaf
                node, pos = leaf, len(tokens)
                break
            label = child.label
            same = common_prefix(label, tokens[pos:pos + len(label)])
            if same < len(label):
                child = self._split(child, same)
            node, pos = child, pos + same
        node.keys.add(value)
        return node

    def _split(self, child: Node, at: int) -> Node:
        """Cut ``child``'s edge after ``at`` tokens; the new upper node is returned (``child`` survives)."""
        parent = child.parent
        upper = Node(child.label[:at], parent)
        parent.children[upper.label[0]] = upper
        child.label = child.label[at:]
        child.parent = upper
        upper.children[child.label[0]] = child
        return upper

    def remove(self, node: Node, value) -> None:
        """Forget ``value`` at ``node``; prune empty leaves and merge single-child chains."""
        node.keys.discard(value)
        while node is not self.root and not node.keys and not node.children:
            parent = node.parent
            del parent.children[node.label[0]]
            node.parent = None
            node = parent
        if node is not self.root and not node.keys and len(node.children) == 1:
            (child,) = node.children.values()
            child.label = node.label + child.label
            child.parent = node.parent
            node.parent.children[child.label[0]] = child
            node.parent = None

    def prefixes(self, tokens: Sequence[int]) -> Iterator[tuple[Node, int]]:
        """Every node holding keys whose tokens are a prefix of ``tokens``, with its depth, shallowest first."""
        tokens = as_ids(tokens)
        node, pos = self.root, 0
        if node.keys:
            yield node, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None or tokens[pos:pos + len(child.label)] != child.label:
                return
            node, pos = child, pos + len(child.label)
            if node.keys:
                yield node, pos

    def token_bytes(self) -> int:
        """Bytes of token ids held in the tree's labels."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.label) * node.label.itemsize
            stack.extend(node.children.values())
        return total
