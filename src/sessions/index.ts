// The sessions layer: multi-branch agent conversations as prefix tries of
// messages, their bounds and expiry, and token-level trajectory export.

export { exportTrajectories, type Trajectory, toJsonl, trajectoryOf } from "./export";
export { canonicalJson, canonicalMessage, digest, MEDIA_INLINE_MAX, messageKey, type SessionMessage, storedMessage, toolsKey } from "./key";
export { checkSessionId, SESSION_DEFAULTS, type Session, SessionStore, type SessionStoreOptions } from "./store";
export {
  DEFAULT_TRIE_LIMITS,
  type PendingBranch,
  SessionError,
  SessionTrie,
  type TrieLimits,
  type TrieNode,
  type TurnInput,
  turnSequence,
} from "./trie";
