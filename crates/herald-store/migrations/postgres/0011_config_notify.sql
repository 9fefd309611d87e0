-- Every node keeps the apps, endpoints, API tokens and ingest sources it reads in a cache,
-- and empties it when another node (or anyone with SQL access) changes one of them. The
-- notification is sent by the database, in the transaction of the change, so no write path
-- can forget it and it arrives only if the change commits. Notification channels belong to
-- the database, not to a schema, so the payload names the schema changed: a node ignores
-- another deployment's (`store.schema`) changes. A transaction's identical notifications are
-- delivered once.
CREATE FUNCTION herald_config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_config', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;

-- Row-level, so an update that matches no row (an endpoint's streak that had already ended)
-- notifies nobody; TRUNCATE has only a statement-level form.
CREATE TRIGGER apps_config_changed AFTER INSERT OR UPDATE OR DELETE ON apps
    FOR EACH ROW EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER apps_config_truncated AFTER TRUNCATE ON apps
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER endpoints_config_changed AFTER INSERT OR UPDATE OR DELETE ON endpoints
    FOR EACH ROW EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER endpoints_config_truncated AFTER TRUNCATE ON endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER api_tokens_config_changed AFTER INSERT OR UPDATE OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER api_tokens_config_truncated AFTER TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER ingest_sources_config_changed AFTER INSERT OR UPDATE OR DELETE ON ingest_sources
    FOR EACH ROW EXECUTE FUNCTION herald_config_changed();
CREATE TRIGGER ingest_sources_config_truncated AFTER TRUNCATE ON ingest_sources
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
