"""The command-line entry points (``gpas-pretrain``, ``gpas-preprocess-data``, …; also run as
``pretrain_gpas.py`` and ``tools/*.py``). Unlike the rest of the library, these modules set
process-wide state: importing one installs the warning filters of ``megatron_ext/quiet.py`` before
megatron-core is imported, and ``gpas-pretrain`` configures logging."""
