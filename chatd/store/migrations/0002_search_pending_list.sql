-- The message search index takes new entries into its pending list (fastupdate), and
-- PostgreSQL merges that list into the index inside whichever insert finds it over
-- gin_pending_list_limit (4 MB by default): that send batch then stalls for 200-300 ms
-- (docs/decisions.md, "The search index merged in the background"). chatd merges it
-- every database.search_merge_interval seconds from a pooled connection instead
-- (chatd/service/maintenance.py); the limit is raised so that an insert only merges
-- if those merges have fallen far behind.
ALTER INDEX events_search SET (fastupdate = on, gin_pending_list_limit = 8192);
