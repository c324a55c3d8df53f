from pipeline.cli import main
from pipeline.process_exit import exit_promptly

# An exception still ends the process the usual way, with its traceback.
exit_promptly(main())
