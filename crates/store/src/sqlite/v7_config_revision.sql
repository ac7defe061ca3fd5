-- Version 7: a revision counter for what token releases are decided on.
--
-- The exchange hot path keeps agents, their keys, grants, connections and users in memory.
-- Every change to those tables moves `config_revision.value` forward, in the same transaction
-- (triggers, so a change by the CLI or another node counts too); a release commits only if the
-- revision is still the one its decision was made at, else the vault re-reads and decides again.
CREATE TABLE config_revision (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    value  INTEGER NOT NULL
);
INSERT INTO config_revision (id, value) VALUES (1, 1);

CREATE TRIGGER agents_rev_i AFTER INSERT ON agents BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER agents_rev_u AFTER UPDATE ON agents BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER agents_rev_d AFTER DELETE ON agents BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER agent_keys_rev_i AFTER INSERT ON agent_keys BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER agent_keys_rev_u AFTER UPDATE ON agent_keys BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER agent_keys_rev_d AFTER DELETE ON agent_keys BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER grants_rev_i AFTER INSERT ON grants BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER grants_rev_u AFTER UPDATE ON grants BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER grants_rev_d AFTER DELETE ON grants BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER connections_rev_i AFTER INSERT ON connections BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER connections_rev_u AFTER UPDATE ON connections BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER connections_rev_d AFTER DELETE ON connections BEGIN UPDATE config_revision SET value = value + 1; END;
-- Only a user's existence matters to a release; sign-ins (TOTP steps) must not flush the cache.
CREATE TRIGGER users_rev_i AFTER INSERT ON users BEGIN UPDATE config_revision SET value = value + 1; END;
CREATE TRIGGER users_rev_d AFTER DELETE ON users BEGIN UPDATE config_revision SET value = value + 1; END;
