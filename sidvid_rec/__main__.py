import sys

from sidvid_rec.cli import main

sys.exit(main())
