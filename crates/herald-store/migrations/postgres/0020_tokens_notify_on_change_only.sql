-- A new API token changes nothing a node has cached (only tokens found are cached, and a
-- digest not yet stored is never one of them), so adding one notifies nobody. An app portal
-- link mints a token per page view: each would otherwise empty every node's cache.
DROP TRIGGER api_tokens_config_changed ON api_tokens;
CREATE TRIGGER api_tokens_config_changed AFTER UPDATE OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION herald_config_changed();
