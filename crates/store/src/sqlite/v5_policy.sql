-- Version 5: a policy per grant (agent × connection), as JSON (`latchkey_core::policy::GrantPolicy`):
-- risk overrides per scope, allowed hours (time windows in IANA zones), a cap on the reported
-- token lifetime, and quotas (per agent and per user, per minute and per day). `{}` adds
-- nothing to the grant's scopes and address allow-list, which is what every existing grant gets.
-- One JSON column rather than a column per setting: the policy is read and written whole, with
-- its grant, and is validated by the domain before it is stored; a value that no longer reads
-- back (edited by hand) makes the grant release nothing.
ALTER TABLE grants ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
